"""The real PLUS scans (616x820): ground-truth DDFs and scores checked pixel by pixel by hand."""

import numpy as np
import pytest
import torch

from utils import metrics
from utils import transform as tf
from utils.Transf2DDFs import cal_global_ddfs, cal_local_ddfs
from utils.calibration import load_calibration
from utils.challenge_data import find_scans, read_scan

SCANS = ["plus_bone_l14", "plus_spine_phantom"]
# (x, y) pixels, 1-based: the four corners, an interior pixel and one in the ultrasound field
PIXELS = [(1, 1), (820, 1), (1, 616), (820, 616), (411, 307), (300, 500)]


@pytest.fixture(scope="module", params=SCANS)
def real_scan(request, realdata_dir):
    root = realdata_dir / request.param
    (ref,) = find_scans(root)
    return read_scan(ref), load_calibration(root / "calib_matrix.csv")


def by_hand(tforms, calib, j, i, x, y):
    """(C^-1 tforms[j]^-1 tforms[i] C S p - S p)[:3] for one pixel, float64 numpy."""
    point_mm = calib.scale @ np.array([x, y, 0.0, 1.0])
    t = np.linalg.inv(calib.calib_R_T) @ np.linalg.inv(tforms[j]) @ tforms[i] @ calib.calib_R_T
    return (t @ point_mm - point_mm)[:3]


def test_ground_truth_ddfs_on_real_scan(real_scan):
    scan, calib = real_scan
    height, width = scan.frame_size
    assert (height, width) == (616, 820)
    tforms64 = scan.tforms.astype(np.float64)
    scale, calib_r_t, _ = calib.as_tensors(torch.float64)
    points = tf.reference_image_points([height, width], [height, width])
    landmark = np.array([[1, 1, 1], [20, 820, 616], [7, 411, 307]])
    gp, gl = cal_global_ddfs(tf.global_transforms(torch.from_numpy(tforms64), calib_r_t), scale, points,
                             landmark, w=width, h=height)
    lp, ll = cal_local_ddfs(tf.local_transforms(torch.from_numpy(tforms64), calib_r_t), scale, points,
                            landmark, w=width, h=height)
    assert gp.shape == lp.shape == (20, 3, height * width) and gp.dtype == np.float32
    for frame in (1, 10, 20):
        for x, y in PIXELS:
            k = (y - 1) * width + (x - 1)
            np.testing.assert_allclose(gp[frame - 1, :, k], by_hand(tforms64, calib, 0, frame, x, y), atol=1e-4)
            np.testing.assert_allclose(lp[frame - 1, :, k], by_hand(tforms64, calib, frame - 1, frame, x, y), atol=1e-4)
    for column, (frame, x, y) in enumerate(landmark):
        np.testing.assert_allclose(gl[:, column], by_hand(tforms64, calib, 0, frame, x, y), atol=1e-4)
        np.testing.assert_allclose(ll[:, column], by_hand(tforms64, calib, frame - 1, frame, x, y), atol=1e-4)
    # the scans really move: displacements of millimetres, not rounding noise
    assert np.abs(gp[-1]).max() > 5.0


def test_real_scan_scores_without_landmarks(real_scan):
    """Identity prediction on a real scan: score 0, errors = mean field norms, landmark scores absent."""
    scan, calib = real_scan
    height, width = scan.frame_size
    scale, calib_r_t, _ = calib.as_tensors(torch.float64)
    tforms = torch.from_numpy(scan.tforms.astype(np.float64))
    glob, loc = tf.global_transforms(tforms, calib_r_t), tf.local_transforms(tforms, calib_r_t)
    identity = metrics.identity_errors_from_transforms(glob, loc, scale, None, height, width)
    eye = torch.eye(4, dtype=torch.float64).expand_as(glob)
    errors = metrics.scan_errors_from_transforms(glob, eye, loc, eye, scale, None, height, width)
    scores = metrics.normalised_scores(errors, identity)
    assert scores["pixel"] == pytest.approx(0.0, abs=1e-12)
    assert np.isnan(scores["final"]) and np.isnan(errors["GLE"]) and np.isnan(errors["LLE"])
    # GPE of the identity is the mean norm of the true global field. The field is affine in (x, y),
    # so by Jensen's inequality its mean norm lies between the norm at the centroid of the pixel grid
    # and the largest norm at the four corners (the norm of an affine field is convex).
    tforms64 = scan.tforms.astype(np.float64)
    centre = np.linalg.norm(by_hand(tforms64, calib, 0, 20, (width + 1) / 2, (height + 1) / 2))
    corners = max(np.linalg.norm(by_hand(tforms64, calib, 0, 20, x, y)) for x, y in PIXELS[:4])
    per_frame = metrics.field_errors_from_transforms(glob, eye, scale, height, width)
    assert centre - 1e-6 <= float(per_frame[-1]) <= corners + 1e-6
    assert corners - centre > 0.1  # the bounds are not trivially equal (the scan rotates)

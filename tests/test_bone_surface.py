"""Bone-surface extraction (utils/bone_surface.py): ridges above shadows, and distances to the phantom's bones."""

import math

import numpy as np
import pytest
import torch

from utils import bone_surface as bones
from utils import reconstruction as rec

PIXEL_MM = (0.2, 0.2)


def bone_frame(seed=0, far_skin=True):
    """A 200x240 frame: speckled tissue, a bone (circle, bright top outline, shadow below) and the
    arm's far skin (a bright line with nothing below). Returns (frame, centre (x, y), radius) in 0-based pixels."""
    rng = np.random.default_rng(seed)
    height, width = 200, 240
    frame = rng.integers(30, 80, (height, width)).astype(np.uint8)
    if far_skin:
        frame[168:171] = 200
        frame[171:] = 0
    cx, cy, r = 120.0, 100.0, 35.0
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    top = cy - np.sqrt(np.clip(r * r - (xx - cx) ** 2, 0, None))
    frame[(np.abs(xx - cx) <= r) & (yy >= top)] = 0  # the shadow, down to the frame's end
    outline = (np.abs(np.hypot(xx - cx, yy - cy) - r) <= 1.5) & (yy <= cy)
    frame[outline] = 230
    return frame, (cx, cy), r


def test_ridge_on_the_bone_outline_and_not_on_the_far_skin():
    frame, (cx, cy), r = bone_frame()
    mask = np.ones(frame.shape, bool)
    found = bones.detect_bone_ridges(frame, mask, PIXEL_MM)
    # the arc's middle: columns that see tissue beyond the 14 mm wide bone within lateral_mm (12 mm) on
    # both sides, x = 95..145 of the arc's 85..155
    assert len(found) > 40
    x, y = found[:, 0] - 1, found[:, 1] - 1  # back to 0-based
    expected = cy - np.sqrt(r * r - (x - cx) ** 2)
    assert np.abs(y - expected).max() <= 1.0  # within a pixel of the outline's centre line
    assert (np.abs(x - cx) < r).all()
    assert (y < 160).all()  # nothing on the far skin (row 168-170), which has no tissue beside its void


def test_no_ridge_in_tissue_without_shadow_or_outside_the_sector():
    rng = np.random.default_rng(1)
    tissue = rng.integers(20, 200, (120, 150)).astype(np.uint8)
    assert len(bones.detect_bone_ridges(tissue, np.ones(tissue.shape, bool), PIXEL_MM)) == 0
    # a bright line right above the sector's edge: the black outside is not a shadow
    frame, _, _ = bone_frame(far_skin=False)
    mask = np.ones(frame.shape, bool)
    mask[110:] = False
    found = bones.detect_bone_ridges(frame, mask, PIXEL_MM)
    assert (found[:, 1] < 110 - 5 / PIXEL_MM[1]).all()


def test_ridge_points_follow_the_transforms():
    rng = np.random.default_rng(2)
    pixels = rng.uniform(1, 100, (6, 2))
    index = np.array([0, 1, 1, 2, 2, 2])
    to_reference = np.stack([np.eye(4)] * 3)
    c, s = math.cos(0.3), math.sin(0.3)
    to_reference[1, :3, :3] = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
    to_reference[2, :3, 3] = [1.0, -2.0, 5.0]
    scale = np.diag([0.3, 0.4, 1, 1])
    points = bones.ridge_points(index, pixels, to_reference, scale)
    for p, f, (x, y) in zip(points, index, pixels):
        np.testing.assert_allclose(p, (to_reference[f] @ [0.3 * x, 0.4 * y, 0, 1])[:3], atol=1e-12)


def test_distance_summary():
    summary = bones.distance_summary([1.0, 2.0, 3.0, np.inf])
    assert summary["count"] == 3 and summary["mean_mm"] == 2.0 and summary["median_mm"] == 2.0
    assert 2.8 < summary["p95_mm"] <= 3.0
    assert bones.distance_summary([])["count"] == 0 and math.isnan(bones.distance_summary([])["p95_mm"])


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """One tiny-preset subject at 240x320 (0.46 x 0.44 mm pixels), whose scans show the bones across."""
    from simulation.dataset import generate_dataset

    root = tmp_path_factory.mktemp("bones")
    generate_dataset(root, "tiny", seed=1, subjects=1, height=240, width=320)
    return root


def test_bone_distance_with_true_poses_is_small_and_grows_with_pose_errors(simulated):
    """Ground-truth poses: the detector's own error. Bound: the echo's peak lies ~0.45 mm inside the
    bone (scatterers fill the cortex's first millimetre, its upper half brightest; -0.46 mm on average on
    480x640 frames), plus up to a pixel (0.44 mm) of quantisation and the column-versus-beam offset:
    mean ~0.5-0.6 mm, 95th percentile ~0.7 mm. We allow 1.0 mm (about two pixels) and 1.5 mm."""
    from simulation.drift import drifting_prediction
    from utils import transform as tf
    from utils.calibration import load_calibration
    from utils.challenge_data import find_scans, read_scan

    calibration = load_calibration(simulated / "calib_matrix.csv")
    scale = calibration.scale
    calib = torch.from_numpy(np.array(calibration.calib_R_T))
    for ref in find_scans(simulated):
        scan = read_scan(ref)
        tforms = torch.from_numpy(scan.tforms.astype(np.float64))
        height, width = scan.frame_size
        mask = rec.probe_sector_mask(height, width, calibration.pixel_size_mm)
        index, pixels = bones.detect_scan_ridges(scan.frames, mask, (scale[0, 0], scale[1, 1]))
        assert len(index) >= 50, ref.key
        phantom, tissue_from_image = bones.phantom_of_scan(bones.side_file_of(simulated, ref.subject, ref.name))
        truth = rec.frames_to_reference(tf.global_transforms(tforms, calib), len(tforms))
        true_points = bones.ridge_points(index, pixels, truth, scale)
        true = bones.distance_summary(bones.bone_distances(true_points, phantom, tissue_from_image[0]))
        assert true["mean_mm"] < 1.0 and true["p95_mm"] < 1.5, (ref.key, true)
        # the same points, placed with a drifting prediction (larger noise than demo's, 24 frames only)
        local = drifting_prediction(tf.local_transforms(tforms, calib), np.random.default_rng(0), bias=0.8,
                                    noise_mm=0.3, noise_rad=0.01)
        predicted = rec.frames_to_reference(tf.chain_local_transforms(local), len(tforms))
        drift_points = bones.ridge_points(index, pixels, predicted, scale)
        drift = bones.distance_summary(bones.bone_distances(drift_points, phantom, tissue_from_image[0]))
        assert drift["mean_mm"] > true["mean_mm"] + 0.2, (ref.key, true, drift)


def test_phantom_of_scan_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        bones.phantom_of_scan(tmp_path / "missing.h5")

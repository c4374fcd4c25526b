"""Evaluation metrics against the official formulas (tests/reference.py, float64 numpy).

Expected values always come from materialised reference DDFs and ``reference.cal_dist``, never
from the code under test. Images are small and non-square so the suite stays fast.
"""

import math

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
from utils import metrics

TOL_MM = 1e-4


def make_scan(seed, num_frames, height, width, scale=ref.REAL_SCALE, step_mm=0.5, step_rad=0.01, num_landmarks=7):
    """A random scan and a drifting prediction: transforms, reference DDFs and landmarks."""
    rng = np.random.default_rng(seed)
    tforms = ref.random_tforms(rng, num_frames)
    tforms_pred = ref.perturbed_tforms(rng, tforms, step_mm, step_rad)
    glob, loc = ref.scan_transforms(tforms, ref.REAL_CALIB_R_T)
    glob_pred, loc_pred = ref.scan_transforms(tforms_pred, ref.REAL_CALIB_R_T)
    gp, lp = ref.scan_ddfs(tforms, ref.REAL_CALIB_R_T, scale, height, width)
    gp_pred, lp_pred = ref.scan_ddfs(tforms_pred, ref.REAL_CALIB_R_T, scale, height, width)
    landmark = np.stack(
        [
            rng.integers(1, num_frames, num_landmarks),  # never frame 0
            rng.integers(1, width + 1, num_landmarks),
            rng.integers(1, height + 1, num_landmarks),
        ],
        axis=1,
    )
    return dict(
        glob=glob, loc=loc, glob_pred=glob_pred, loc_pred=loc_pred, gp=gp, lp=lp, gp_pred=gp_pred,
        lp_pred=lp_pred, landmark=landmark, scale=scale, height=height, width=width,
        gl=ref.landmark_ddfs(gp, landmark, width), ll=ref.landmark_ddfs(lp, landmark, width),
        gl_pred=ref.landmark_ddfs(gp_pred, landmark, width), ll_pred=ref.landmark_ddfs(lp_pred, landmark, width),
    )


def reference_errors(scan, pred=True):
    """The official four errors of a scan, from materialised float64 reference arrays."""
    def zeros_or(name):
        return scan[name + "_pred"] if pred else np.zeros_like(scan[name])

    return {
        "GPE": ref.cal_dist(scan["gp"], zeros_or("gp"), "all"),
        "GLE": ref.cal_dist(scan["gl"], zeros_or("gl"), "landmark"),
        "LPE": ref.cal_dist(scan["lp"], zeros_or("lp"), "all"),
        "LLE": ref.cal_dist(scan["ll"], zeros_or("ll"), "landmark"),
    }


def errors_from_transforms(scan, dtype=torch.float64, chunk_frames=None, landmark="scan"):
    def as_t(array):
        return torch.as_tensor(array, dtype=dtype)

    return metrics.scan_errors_from_transforms(
        as_t(scan["glob"]), as_t(scan["glob_pred"]), as_t(scan["loc"]), as_t(scan["loc_pred"]),
        torch.as_tensor(scan["scale"]), scan["landmark"] if isinstance(landmark, str) else landmark,
        scan["height"], scan["width"], chunk_frames=chunk_frames,
    )


def assert_errors_close(actual, expected, tol=TOL_MM):
    assert set(actual) == set(metrics.ERROR_NAMES)
    for name in metrics.ERROR_NAMES:
        assert actual[name] == pytest.approx(expected[name], abs=tol), name


@pytest.fixture(scope="module")
def scan():
    return make_scan(0, 12, 9, 13)


# --------------------------------------------------------------------------------------------
# cal_dist
# --------------------------------------------------------------------------------------------


def test_cal_dist_matches_reference(scan):
    assert metrics.cal_dist(scan["gp"], scan["gp_pred"]) == pytest.approx(ref.cal_dist(scan["gp"], scan["gp_pred"]), rel=1e-12)
    assert metrics.cal_dist(scan["gl"], scan["gl_pred"], "landmark") == pytest.approx(
        ref.cal_dist(scan["gl"], scan["gl_pred"], "landmark"), rel=1e-12
    )


def test_cal_dist_rejects_bad_mode_and_shapes(scan):
    with pytest.raises(ValueError, match="mode='pixel'"):
        metrics.cal_dist(scan["gp"], scan["gp_pred"], "pixel")
    with pytest.raises(ValueError, match="differs"):
        metrics.cal_dist(scan["gp"], scan["gp_pred"][:-1])
    with pytest.raises(ValueError, match=r"\[3, K\]"):
        metrics.cal_dist(scan["gp"], scan["gp_pred"], "landmark")


# --------------------------------------------------------------------------------------------
# Errors from transforms
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seed, frames, height, width, chunk",
    [(1, 12, 9, 13, None), (2, 9, 30, 40, 1), (3, 17, 13, 9, 4), (4, 6, 30, 40, 100)],
)
def test_errors_from_transforms_equal_official(seed, frames, height, width, chunk):
    scan = make_scan(seed, frames, height, width)
    assert_errors_close(errors_from_transforms(scan, chunk_frames=chunk), reference_errors(scan))
    assert_errors_close(errors_from_transforms(scan, torch.float32, chunk), reference_errors(scan))


def test_errors_from_transforms_non_uniform_scale_and_large_errors():
    # Pixels of 0.7 x 0.3 mm and a prediction that drifts by centimetres: large values stress
    # the float32 evaluation and its float64 accumulation.
    scale = np.diag([0.7, 0.3, 1.0, 1.0])
    scan = make_scan(5, 10, 30, 40, scale=scale, step_mm=20.0, step_rad=0.2)
    expected = reference_errors(scan)
    assert expected["GPE"] > 50
    assert_errors_close(errors_from_transforms(scan), expected)


def test_errors_from_transforms_full_size_frames():
    # The real image size: 307200 pixels per frame summed without float32 drift.
    scan = make_scan(6, 4, 480, 640, step_mm=30.0, step_rad=0.3, num_landmarks=20)
    assert_errors_close(errors_from_transforms(scan), reference_errors(scan))


def test_per_frame_errors_match_reference(scan):
    per_frame = metrics.field_errors_from_transforms(
        scan["glob"], scan["glob_pred"], scan["scale"], scan["height"], scan["width"], chunk_frames=5
    )
    expected = np.sqrt(((scan["gp"] - scan["gp_pred"]) ** 2).sum(axis=1)).mean(axis=1)
    np.testing.assert_allclose(per_frame.numpy(), expected, atol=TOL_MM, rtol=0)
    landmarks = metrics.landmark_errors_from_transforms(
        scan["loc"], scan["loc_pred"], scan["scale"], scan["landmark"], scan["height"], scan["width"]
    )
    np.testing.assert_allclose(landmarks.numpy(), np.linalg.norm(scan["ll"] - scan["ll_pred"], axis=0), atol=1e-9)


def test_ground_truth_scores_one_and_identity_scores_zero(scan):
    truth = metrics.scan_errors_from_transforms(
        scan["glob"], scan["glob"], scan["loc"], scan["loc"], scan["scale"], scan["landmark"], scan["height"], scan["width"]
    )
    assert all(value == 0.0 for value in truth.values())
    identity = metrics.identity_errors_from_transforms(
        scan["glob"], scan["loc"], scan["scale"], scan["landmark"], scan["height"], scan["width"]
    )
    assert_errors_close(identity, reference_errors(scan, pred=False))
    perfect = metrics.normalised_scores(truth, identity)
    assert all(value == 1.0 for value in perfect.values())
    eye = np.broadcast_to(np.eye(4), scan["glob"].shape)
    as_identity = metrics.scan_errors_from_transforms(
        scan["glob"], eye, scan["loc"], eye, scan["scale"], scan["landmark"], scan["height"], scan["width"]
    )
    zero = metrics.normalised_scores(as_identity, identity)
    for name in metrics.SCORE_NAMES:
        assert zero[name] == pytest.approx(0.0, abs=1e-12), name


def test_no_landmarks_gives_nan_landmark_metrics(scan):
    errors = errors_from_transforms(scan, landmark=None)
    assert math.isnan(errors["GLE"]) and math.isnan(errors["LLE"])
    expected = reference_errors(scan)
    assert errors["GPE"] == pytest.approx(expected["GPE"], abs=TOL_MM)
    identity = metrics.identity_errors_from_transforms(scan["glob"], scan["loc"], scan["scale"], None, scan["height"], scan["width"])
    scores = metrics.normalised_scores(errors, identity)
    for name in ("GLE*", "LLE*", "final", "global", "local", "landmark"):
        assert math.isnan(scores[name]), name
    for name in ("GPE*", "LPE*", "pixel"):
        assert math.isfinite(scores[name]), name
    assert scores["pixel"] == pytest.approx((scores["GPE*"] + scores["LPE*"]) / 2)


def test_scores_combine_terms_as_the_challenge_does():
    errors = {"GPE": 1.0, "GLE": 2.0, "LPE": 0.5, "LLE": 0.25}
    identity = {"GPE": 4.0, "GLE": 4.0, "LPE": 1.0, "LLE": 1.0}
    scores = metrics.normalised_scores(errors, identity)
    terms = {"GPE*": 0.75, "GLE*": 0.5, "LPE*": 0.5, "LLE*": 0.75}
    for name, value in terms.items():
        assert scores[name] == pytest.approx(value)
    assert scores["final"] == pytest.approx(0.625)
    assert scores["global"] == pytest.approx(0.625)
    assert scores["local"] == pytest.approx(0.625)
    assert scores["pixel"] == pytest.approx(0.625)
    assert scores["landmark"] == pytest.approx(0.625)
    # A scan without motion cannot be normalised: NaN, not a division error.
    assert math.isnan(metrics.normalised_scores(errors, {**identity, "GPE": 0.0})["GPE*"])


def test_transform_path_refuses_bad_inputs(scan):
    bad = scan["glob_pred"].copy()
    bad[3, 0, 1] = np.nan
    with pytest.raises(ValueError, match="tform_pred holds NaN"):
        metrics.scan_errors_from_transforms(
            scan["glob"], bad, scan["loc"], scan["loc_pred"], scan["scale"], scan["landmark"], scan["height"], scan["width"]
        )
    with pytest.raises(ValueError, match=r"\[N-1, 4, 4\]"):
        metrics.scan_errors_from_transforms(
            scan["glob"], scan["glob_pred"][:, :3], scan["loc"], scan["loc_pred"], scan["scale"], None, scan["height"], scan["width"]
        )
    with pytest.raises(ValueError, match="N >= 2"):
        metrics.field_errors_from_transforms(np.zeros((0, 4, 4)), np.zeros((0, 4, 4)), ref.REAL_SCALE, 9, 13)
    landmark = scan["landmark"].copy()
    landmark[2, 0] = 0  # frame 0 has no DDF row
    with pytest.raises(ValueError, match=r"has frame index 0, expected 1\.\."):
        errors_from_transforms(scan, landmark=landmark)
    landmark = scan["landmark"].copy()
    landmark[1, 1] = scan["width"] + 1
    with pytest.raises(ValueError, match=r"has x 14, expected 1\.\.13"):
        errors_from_transforms(scan, landmark=landmark)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    angle=st.floats(0.0, 0.5),
    shift=st.floats(0.0, 20.0),
)
def test_field_error_symmetric_and_zero_iff_equal(seed, angle, shift):
    rng = np.random.default_rng(seed)
    true = np.stack([ref.rigid(*rng.uniform(-np.pi, np.pi, 3), rng.uniform(-100, 100, 3)) for _ in range(3)])
    delta = np.stack([ref.rigid(*(angle * rng.uniform(-1, 1, 3)), shift * rng.uniform(-1, 1, 3)) for _ in range(3)])
    pred = true @ delta
    forward = metrics.field_errors_from_transforms(true, pred, ref.REAL_SCALE, 9, 13)
    backward = metrics.field_errors_from_transforms(pred, true, ref.REAL_SCALE, 9, 13)
    torch.testing.assert_close(forward, backward, rtol=0, atol=1e-5)
    assert torch.all(metrics.field_errors_from_transforms(true, true, ref.REAL_SCALE, 9, 13) == 0)
    expected = np.sqrt(((ref.ddf(true[0], ref.REAL_SCALE, 9, 13) - ref.ddf(pred[0], ref.REAL_SCALE, 9, 13)) ** 2).sum(0)).mean()
    assert float(forward[0]) == pytest.approx(expected, abs=TOL_MM)
    if angle > 1e-3 or shift > 1e-3:
        assert bool(torch.all(forward > 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_transform_path_on_cuda(scan):
    def as_cuda(array):
        return torch.as_tensor(array, device="cuda")

    errors = metrics.scan_errors_from_transforms(
        as_cuda(scan["glob"]), as_cuda(scan["glob_pred"]), as_cuda(scan["loc"]), as_cuda(scan["loc_pred"]),
        scan["scale"], scan["landmark"], scan["height"], scan["width"],
    )
    assert_errors_close(errors, reference_errors(scan))


# --------------------------------------------------------------------------------------------
# Errors from DDF arrays
# --------------------------------------------------------------------------------------------


def ddf_args(scan, dtype=np.float32):
    return [scan[name].astype(dtype) for name in ("gp", "gl", "lp", "ll", "gp_pred", "gl_pred", "lp_pred", "ll_pred")]


@pytest.mark.parametrize("chunk", [None, 1, 5])
def test_ddf_path_equals_reference_and_transform_path(scan, chunk):
    from_ddfs = metrics.scan_errors_from_ddfs(*ddf_args(scan), chunk_frames=chunk)
    assert_errors_close(from_ddfs, reference_errors(scan))
    assert_errors_close(from_ddfs, errors_from_transforms(scan))
    identity = metrics.identity_errors_from_ddfs(*ddf_args(scan)[:4], chunk_frames=chunk)
    assert_errors_close(identity, reference_errors(scan, pred=False))


def test_ddf_path_streams_from_h5py_and_memmap(tmp_path):
    scan = make_scan(7, 11, 30, 40)
    names = ("gp", "gl", "lp", "ll", "gp_pred", "gl_pred", "lp_pred", "ll_pred")
    with h5py.File(tmp_path / "ddfs.h5", "w") as file:
        for name in names:
            file.create_dataset(name, data=scan[name].astype(np.float32))
    with h5py.File(tmp_path / "ddfs.h5", "r") as file:
        from_h5 = metrics.scan_errors_from_ddfs(*(file[name] for name in names), chunk_frames=3)
    assert_errors_close(from_h5, reference_errors(scan))
    arrays = []
    for name in names:
        path = tmp_path / f"{name}.npy"
        np.save(path, scan[name].astype(np.float32))
        arrays.append(np.load(path, mmap_mode="r"))
    from_memmap = metrics.scan_errors_from_ddfs(*arrays, chunk_frames=4)
    assert_errors_close(from_memmap, reference_errors(scan))


def test_ddf_path_without_landmarks(scan):
    gp, _, lp, _, gp_pred, _, lp_pred, _ = ddf_args(scan)
    errors = metrics.scan_errors_from_ddfs(gp, None, lp, None, gp_pred, None, lp_pred, None)
    assert math.isnan(errors["GLE"]) and math.isnan(errors["LLE"])
    assert errors["LPE"] == pytest.approx(reference_errors(scan)["LPE"], abs=TOL_MM)
    with pytest.raises(ValueError, match="all given or all None"):
        metrics.scan_errors_from_ddfs(gp, scan["gl"], lp, None, gp_pred, None, lp_pred, None)


def test_ddf_path_refuses_nan_and_wrong_shapes(scan):
    args = ddf_args(scan)
    bad = args[6].copy()
    bad[4, 2, 7] = np.inf
    with pytest.raises(ValueError, match=r"LP_pred holds NaN or inf values \(first at index \[4, 2, 7\]\)"):
        metrics.scan_errors_from_ddfs(*args[:6], bad, args[7], chunk_frames=3)
    bad_landmark = args[5].copy()
    bad_landmark[0, 0] = np.nan
    with pytest.raises(ValueError, match="GL_pred holds NaN"):
        metrics.scan_errors_from_ddfs(*args[:5], bad_landmark, *args[6:])
    with pytest.raises(ValueError, match=r"GP_pred has shape \(10, 3, 117\), expected \(11, 3, 117\)"):
        metrics.scan_errors_from_ddfs(*args[:4], args[4][1:], *args[5:])
    with pytest.raises(ValueError, match=r"LL_pred has shape \(3, 6\), expected \(3, 7\)"):
        metrics.scan_errors_from_ddfs(*args[:7], args[7][:, 1:])
    with pytest.raises(ValueError, match=r"GP_true must be a DDF array \[N-1, 3, H\*W\]"):
        metrics.scan_errors_from_ddfs(args[0][:, :2], *args[1:])


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def test_tables_summary_and_csv(tmp_path):
    rows = []
    for index, (protocol, landmarks) in enumerate([("rotation", True), ("rotation", True), ("line", True), ("line", False)]):
        errors = {"GPE": 1.0 + index, "GLE": 2.0 if landmarks else math.nan, "LPE": 0.5, "LLE": 0.25 if landmarks else math.nan}
        identity = {"GPE": 10.0, "GLE": 4.0 if landmarks else math.nan, "LPE": 1.0, "LLE": 1.0 if landmarks else math.nan}
        rows.append(metrics.scan_row(f"{index:03d}", "LH_rotation", errors, identity, runtime_s=0.1 * index, protocol=protocol))
    table = metrics.results_table(rows)
    assert list(table.columns) == list(metrics.ROW_COLUMNS) + ["protocol"]
    assert table.loc[0, "GPE*"] == pytest.approx(0.9)
    summary = metrics.summarise(table)
    assert summary.loc["all", "num_scans"] == 4
    assert summary.loc["all", "GPE_mean"] == pytest.approx(2.5)
    assert summary.loc["all", "GPE_std"] == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert math.isnan(summary.loc["all", "final_mean"])  # one scan lacks landmarks
    assert summary.loc["all", "pixel_mean"] == pytest.approx(table["pixel"].mean())
    grouped = metrics.summarise(table, by="protocol")
    assert list(grouped.index) == ["line", "rotation"]
    assert grouped.loc["rotation", "final_mean"] == pytest.approx(table.loc[:1, "final"].mean())
    assert math.isnan(grouped.loc["line", "final_mean"])
    path = metrics.write_csv(table, tmp_path / "out" / "scans.csv")
    back = pd.read_csv(path, dtype={"subject": str})
    assert list(back["subject"]) == ["000", "001", "002", "003"]
    np.testing.assert_allclose(back["GPE*"], table["GPE*"])
    metrics.write_csv(grouped, tmp_path / "summary.csv", index=True)
    assert pd.read_csv(tmp_path / "summary.csv", index_col=0).loc["rotation", "num_scans"] == 2
    assert not list(tmp_path.glob("**/*.partial*"))
    with pytest.raises(ValueError, match="cannot group by"):
        metrics.summarise(table, by="site")
    with pytest.raises(ValueError, match="clash"):
        metrics.scan_row("000", "x", rows[0], rows[0], GPE=1.0)

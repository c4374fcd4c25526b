"""The challenge entry point ``predict_ddfs(frames, landmark, data_path_calib, device)``, called the way
the official harness (``submission/test.py``) calls it, on a tiny dataset in the validation/test layout."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
import torch

import models
import predict_ddfs as entry
from test_generate import tiny_root, tiny_test_root, write_checkpoint  # noqa: F401  (fixtures; registers the test doubles)
from utils import metrics
from utils import transform as tf
from utils.calibration import load_calibration
from utils.challenge_data import find_scans, read_scan
from utils.evaluation import PredictionSettings, evaluate_scan
from utils.Transf2DDFs import cal_global_ddfs, cal_local_ddfs


@pytest.fixture(autouse=True)
def fresh_cache():
    entry.clear_cache()
    yield
    entry.clear_cache()


def official_harness(data_folder, device):
    """The official test.py loop: keys from dataset_keys.h5, frames/landmarks read per scan, cal_dist
    against ground-truth DDFs. Returns {key: (GP, GL, LP, LL, {error: value})}."""
    data_path_frame = os.path.join(data_folder, "frames")
    data_path_transf = os.path.join(data_folder, "transfs")
    data_path_landmark = os.path.join(data_folder, "landmarks")
    data_path_calib = os.path.join(data_folder, "calib_matrix.csv")
    calibration = load_calibration(data_path_calib)
    scale = torch.as_tensor(np.array(calibration.scale), dtype=torch.float32)
    calib_r_t = torch.as_tensor(np.array(calibration.calib_R_T))
    out = {}
    with h5py.File(os.path.join(data_folder, "dataset_keys.h5"), "r") as dataset_keys:
        keys = list(dataset_keys.keys())
    for scan_name in keys:
        subject, name = scan_name.split("__")[0][3:], scan_name.split("__")[1]
        with h5py.File(os.path.join(data_path_frame, subject, name + ".h5"), "r") as file:
            frames = file["frames"][()]
        with h5py.File(os.path.join(data_path_landmark, "landmark_%03d.h5" % int(subject)), "r") as file:
            landmark = file[name][()]
        GP, GL, LP, LL = entry.predict_ddfs(frames, landmark, data_path_calib, device)
        with h5py.File(os.path.join(data_path_transf, subject, name + ".h5"), "r") as file:
            tforms = torch.from_numpy(file["tforms"][()].astype(np.float64))
        height, width = frames.shape[1:]
        points = tf.reference_image_points([height, width], [height, width])
        true_gp, true_gl = cal_global_ddfs(tf.global_transforms(tforms, calib_r_t).float(), scale, points, landmark,
                                           width, height)
        true_lp, true_ll = cal_local_ddfs(tf.local_transforms(tforms, calib_r_t).float(), scale, points, landmark,
                                          width, height)
        errors = {"GPE": metrics.cal_dist(true_gp, GP, "all"), "GLE": metrics.cal_dist(true_gl, GL, "landmark"),
                  "LPE": metrics.cal_dist(true_lp, LP, "all"), "LLE": metrics.cal_dist(true_ll, LL, "landmark")}
        out[scan_name] = (frames, landmark, (GP, GL, LP, LL), errors)
    return out


def test_called_like_the_official_harness(tiny_root, tiny_test_root, tmp_path, monkeypatch):
    torch.manual_seed(0)
    state = models.build_model("efficientnet_b1", 2, 6).state_dict()
    ckpt = write_checkpoint(tmp_path / "best.pt", tiny_root, "efficientnet_b1", state=state)
    monkeypatch.setenv(entry.CHECKPOINT_ENV, str(ckpt))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = official_harness(str(tiny_test_root), device)
    assert sorted(results) == ["sub000__LH_rotation", "sub000__RH_rotation"]
    refs = {ref.key: ref for ref in find_scans(tiny_test_root)}
    calibration = load_calibration(tiny_test_root / "calib_matrix.csv")
    model = models.build_model("efficientnet_b1", 2, 6)
    model.load_state_dict(state)
    for key, (frames, landmark, ddfs, errors) in results.items():
        n, h, w = frames.shape
        k = len(landmark)
        for array, shape in zip(ddfs, [(n - 1, 3, h * w), (3, k), (n - 1, 3, h * w), (3, k)]):
            assert isinstance(array, np.ndarray) and array.dtype == np.float32 and array.shape == shape
            assert np.isfinite(array).all()
        # The same network through our evaluation flow (errors from transforms) gives the same numbers.
        ours = evaluate_scan(model, PredictionSettings(), refs[key], calibration, "cpu")
        for name in ("GPE", "GLE", "LPE", "LLE"):
            assert abs(ours.errors[name] - errors[name]) < 1e-4, (key, name)


def test_model_is_cached_across_calls_and_identity_gives_zero_fields(tiny_root, tiny_test_root, tmp_path,
                                                                       monkeypatch):
    ckpt = write_checkpoint(tmp_path / "best.pt", tiny_root, "test_identity")
    monkeypatch.setenv(entry.CHECKPOINT_ENV, str(ckpt))
    loads = []
    real_load = entry.load_checkpoint
    monkeypatch.setattr(entry, "load_checkpoint", lambda path: loads.append(path) or real_load(path))
    scan = read_scan(find_scans(tiny_test_root)[0])
    calib = str(tiny_test_root / "calib_matrix.csv")
    for _ in range(2):
        GP, GL, LP, LL = entry.predict_ddfs(scan.frames, scan.landmarks, calib, "cpu")
        assert not GP.any() and not GL.any() and not LP.any() and not LL.any()
    assert len(loads) == 1
    entry.predict_ddfs(scan.frames, scan.landmarks, calib, torch.device("cpu"))  # same key as "cpu"
    assert len(loads) == 1
    # Without landmarks (e.g. the real PLUS scans) the landmark fields are empty, not an error.
    _, GL, _, LL = entry.predict_ddfs(scan.frames, None, calib, "cpu")
    assert GL.shape == (3, 0) and LL.shape == (3, 0)


def test_checkpoint_must_be_named_by_the_environment(monkeypatch, tmp_path, tiny_test_root):
    scan = read_scan(find_scans(tiny_test_root)[0])
    calib = str(tiny_test_root / "calib_matrix.csv")
    monkeypatch.delenv(entry.CHECKPOINT_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=entry.CHECKPOINT_ENV):
        entry.predict_ddfs(scan.frames, scan.landmarks, calib, "cpu")
    monkeypatch.setenv(entry.CHECKPOINT_ENV, str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        entry.predict_ddfs(scan.frames, scan.landmarks, calib, "cpu")


def test_nan_prediction_raises(tiny_root, tiny_test_root, tmp_path, monkeypatch):
    monkeypatch.setenv(entry.CHECKPOINT_ENV, str(write_checkpoint(tmp_path / "nan.pt", tiny_root, "test_nan")))
    scan = read_scan(find_scans(tiny_test_root)[0])
    with pytest.raises(ValueError, match="not finite"):
        entry.predict_ddfs(scan.frames, scan.landmarks, str(tiny_test_root / "calib_matrix.csv"), "cpu")

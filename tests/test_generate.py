"""Whole-scan evaluation (utils/evaluation.py) and the generate_DDF.py script, on tiny synthetic scans.

Test doubles stand in for trained networks where the expected numbers are known exactly:
``IdentityNet`` predicts no motion (score 0, errors = the identity errors), ``GroundTruthNet`` finds
its input window in the scans it was given and returns the true transforms (score 1, zero errors),
``NaNNet`` returns NaN (refused before anything is written). An untrained efficientnet_b1 gives
non-trivial errors to compare with the official ``cal_dist`` on materialised DDFs.
"""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

import generate_DDF
import models
from options.core import options_to_dict
from options.train_options import TrainOptions
from simulation.dataset import generate_dataset
from utils import metrics
from utils import transform as tf
from utils.calibration import load_calibration
from utils.challenge_data import CALIB_FILE, find_scans, read_scan
from utils.checkpoint import rng_state, save_checkpoint
from utils.evaluation import (
    RESULTS_MARKER,
    PredictionSettings,
    evaluate_scan,
    replaced_folder,
    scan_protocol,
    summary_table,
)
from utils.training_data import downsample_frames
from utils.Transf2DDFs import cal_global_ddfs, cal_local_ddfs

# --------------------------------------------------------------------------------------------
# Test doubles
# --------------------------------------------------------------------------------------------


class IdentityNet(torch.nn.Module):
    """Predicts ``parameter`` zeros, i.e. identity transforms, for every pair."""

    def __init__(self, in_frames: int, pred_dim: int):
        super().__init__()
        self.pred_dim = pred_dim

    def forward(self, x):
        return torch.zeros(x.shape[0], self.pred_dim, dtype=x.dtype, device=x.device)


class NaNNet(IdentityNet):
    """Predicts NaN."""

    def forward(self, x):
        return torch.full((x.shape[0], self.pred_dim), math.nan, dtype=x.dtype, device=x.device)


class GroundTruthNet(torch.nn.Module):
    """Returns the true ``T_{a<-b}`` (``transform`` values, float64) of every pair of its input window.

    It finds the window by its content among the frames of ``scans`` (float32 frames / 255, exactly
    what the prediction feeds the network), down-sampled by ``downsample`` as the network would see
    them, so it also checks that the frames arrive in order and down-sampled as trained.
    """

    def __init__(self, scans, calib_r_t, num_samples: int, num_pred: int, downsample: int = 1):
        super().__init__()
        self.frames = [torch.from_numpy(np.ascontiguousarray(downsample_frames(s.frames, downsample))).float() / 255
                       for s in scans]
        self.tforms = [torch.from_numpy(s.tforms.astype(np.float64)) for s in scans]
        self.calib_r_t = torch.as_tensor(np.array(calib_r_t), dtype=torch.float64)
        self.num_samples = num_samples
        self.pairs = tf.pair_samples(num_samples, num_pred)
        self.input_sizes = set()

    def _find(self, window):
        for frames, tforms in zip(self.frames, self.tforms):
            if frames.shape[1:] != window.shape[1:]:
                continue
            first = torch.nonzero((frames == window[0]).flatten(1).all(dim=1))[:, 0].tolist()
            for start in first:
                if start + self.num_samples <= len(frames) and torch.equal(frames[start:start + self.num_samples], window):
                    return tforms[start:start + self.num_samples]
        raise AssertionError("the network was given a window that is no window of the scans")

    def forward(self, x):
        self.input_sizes.add(tuple(x.shape[2:]))
        out = [tf.matrix_to_transform12(tf.relative_transforms(self._find(window), self.pairs, self.calib_r_t)).reshape(-1)
               for window in x.float()]
        return torch.stack(out)


for _name, _cls in (("test_identity", IdentityNet), ("test_nan", NaNNet)):
    if _name not in models.available_models():
        models.register_model(_name)(_cls)


# --------------------------------------------------------------------------------------------
# Data and checkpoints
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """2 subjects x 2 rotation scans x 24 frames of 120x160 with landmarks, train layout."""
    root = tmp_path_factory.mktemp("tiny_train")
    generate_dataset(root, "tiny", seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_test_root(tmp_path_factory) -> Path:
    """1 subject, validation/test layout (frames/, transfs/, dataset_keys.h5)."""
    root = tmp_path_factory.mktemp("tiny_test")
    generate_dataset(root, "tiny", seed=1, layout="test", subjects=1)
    return root


def write_checkpoint(path, root, model_name="test_identity", *, pred_type="parameter", num_samples=2, num_pred=1,
                     downsample=1, folds=((0,), (1,)), test_folds=(1,), val_folds=(), state=None) -> Path:
    """A checkpoint as train.py writes it, with folds of subject ids and the model's weights."""
    label_type = "transform" if pred_type == "transform" else "point"
    options = TrainOptions(data_path=str(root), pred_type=pred_type, label_type=label_type, num_samples=num_samples,
                           sample_range=num_samples, num_pred=num_pred, downsample=downsample,
                           num_folds=len(folds), train_folds=[0], val_folds=list(val_folds),
                           test_folds=list(test_folds))
    pred_dim = tf.type_dim(pred_type, 4, len(tf.pair_samples(num_samples, num_pred)))
    if state is None:
        state = models.build_model(model_name, num_samples, pred_dim).state_dict()
    checkpoint = {"format_version": 1, "model": state, "optimizer": None, "scheduler": None, "scaler": None,
                  "epoch": 0, "batch_in_epoch": 0, "step": 0, "best": {}, "options": options_to_dict(options),
                  "model_args": models.model_args(model_name, num_samples, pred_dim), "rng": rng_state(),
                  "folds": [list(f) for f in folds]}
    return save_checkpoint(path, checkpoint)


def materialised_errors(result, scale):
    """The official way: the four DDFs of truth and prediction as full arrays, then ``cal_dist``."""
    height, width = result.frame_size
    points = tf.reference_image_points([height, width], [height, width])
    scale = torch.as_tensor(scale, dtype=torch.float32)
    landmark = result.landmarks
    true_gp, true_gl = cal_global_ddfs(result.global_true.float(), scale, points, landmark, width, height)
    true_lp, true_ll = cal_local_ddfs(result.local_true.float(), scale, points, landmark, width, height)
    pred_gp, pred_gl = cal_global_ddfs(result.global_pred.float(), scale, points, landmark, width, height)
    pred_lp, pred_ll = cal_local_ddfs(result.local_pred.float(), scale, points, landmark, width, height)
    return {"GPE": metrics.cal_dist(true_gp, pred_gp, "all"), "GLE": metrics.cal_dist(true_gl, pred_gl, "landmark"),
            "LPE": metrics.cal_dist(true_lp, pred_lp, "all"), "LLE": metrics.cal_dist(true_ll, pred_ll, "landmark")}


@pytest.fixture(scope="session")
def tiny_scans(tiny_root):
    refs = find_scans(tiny_root)
    return refs, [read_scan(ref) for ref in refs], load_calibration(tiny_root / CALIB_FILE)


# --------------------------------------------------------------------------------------------
# utils.evaluation
# --------------------------------------------------------------------------------------------


def test_identity_model_scores_zero_with_the_identity_errors(tiny_scans):
    refs, scans, calibration = tiny_scans
    model = IdentityNet(2, 6)
    result = evaluate_scan(model, PredictionSettings(), refs[0], calibration, "cpu", scan=scans[0])
    assert result.errors == result.identity_errors
    assert all(value > 0 for value in result.identity_errors.values())
    for name in ("GPE*", "GLE*", "LPE*", "LLE*", "final", "global", "local", "pixel", "landmark"):
        assert result.scores[name] == 0.0
    identity = torch.eye(4, dtype=torch.float64).expand_as(result.global_true)
    torch.testing.assert_close(result.global_pred, identity, rtol=0, atol=1e-12)
    assert result.runtime_s > 0 and result.num_frames == 24


@pytest.mark.parametrize("num_samples, num_pred, downsample", [(2, 1, 1), (4, 1, 1), (3, 2, 2)])
def test_ground_truth_double_scores_one_on_every_frame(tiny_scans, num_samples, num_pred, downsample):
    """Every frame gets its own true transform, the last ones included (the official code leaves the
    last NUM_SAMPLES-2 frames at the previous pose), and down-sampled models see down-sampled frames
    while their transforms stay in the original image's mm frame."""
    refs, scans, calibration = tiny_scans
    model = GroundTruthNet(scans, calibration.calib_R_T, num_samples, num_pred, downsample)
    settings = PredictionSettings(pred_type="transform", num_samples=num_samples, num_pred=num_pred,
                                  downsample=downsample)
    result = evaluate_scan(model, settings, refs[1], calibration, "cpu", scan=scans[1])
    assert model.input_sizes == {(120 // downsample, 160 // downsample)}
    assert result.frame_size == (120, 160)
    for name, value in result.errors.items():
        assert value < 1e-6, (name, value)
    assert np.abs(result.frame_errors_global).max() < 1e-6  # the last frames too
    assert result.scores["final"] == pytest.approx(1.0, abs=1e-7)


def test_errors_equal_the_foundation_and_cal_dist_on_materialised_arrays(tiny_scans):
    refs, scans, calibration = tiny_scans
    torch.manual_seed(0)
    model = models.build_model("efficientnet_b1", 2, 6).eval()
    result = evaluate_scan(model, PredictionSettings(), refs[2], calibration, "cpu", scan=scans[2])
    scale = np.array(calibration.scale)
    height, width = result.frame_size
    foundation = metrics.scan_errors_from_transforms(result.global_true, result.global_pred, result.local_true,
                                                     result.local_pred, scale, result.landmarks, height, width)
    assert result.errors == foundation
    official = materialised_errors(result, scale)
    for name in ("GPE", "GLE", "LPE", "LLE"):
        assert result.errors[name] > 0.1
        assert abs(result.errors[name] - official[name]) < 1e-4, name
    assert result.frame_errors_global.mean() == pytest.approx(result.errors["GPE"], rel=1e-12)


def test_protocols_and_summary_groups():
    assert scan_protocol("LH_rotation") == "rotation"
    assert scan_protocol("RH_Per_S_PtD") == "sweep"
    assert scan_protocol("BoneUltrasound_L14") == "other"
    errors = {"GPE": 2.0, "GLE": 1.0, "LPE": 0.5, "LLE": 0.4}
    identity = {"GPE": 4.0, "GLE": 2.0, "LPE": 1.0, "LLE": 0.8}
    rows = [metrics.scan_row("000", name, errors, identity, 1.0, protocol=scan_protocol(name))
            for name in ("LH_rotation", "RH_rotation", "LH_Par_L_DtP")]
    summary = summary_table(metrics.results_table(rows))
    assert list(summary.index) == ["all", "rotation", "sweep"]
    assert summary.loc["all", "num_scans"] == 3 and summary.loc["sweep", "final_mean"] == pytest.approx(0.5)


def test_replaced_folder_keeps_the_old_result_on_error_and_refuses_foreign_folders(tmp_path):
    out = tmp_path / "out"
    with replaced_folder(out) as staging:
        (staging / "a.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with replaced_folder(out) as staging:
            (staging / "a.txt").write_text("second")
            raise RuntimeError("boom")
    assert (out / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left behind
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match="refusing to replace"):
        with replaced_folder(foreign):
            pass
    assert (foreign / "thesis.tex").read_text() == "precious"


# --------------------------------------------------------------------------------------------
# generate_DDF.py
# --------------------------------------------------------------------------------------------


def test_main_writes_scores_plots_ddfs_and_equals_cal_dist(tiny_root, tiny_scans, tmp_path):
    torch.manual_seed(0)
    state = models.build_model("efficientnet_b1", 2, 6).state_dict()
    ckpt = write_checkpoint(tmp_path / "run" / "best.pt", tiny_root, "efficientnet_b1", state=state)
    out, summary = generate_DDF.main(["--ckpt", str(ckpt), "--plots", "--save_ddfs"])
    assert out == tmp_path / "run" / "generate-test"
    table = pd.read_csv(out / "scores.csv", dtype={"subject": str})
    assert table["key"].tolist() == ["sub001__LH_rotation", "sub001__RH_rotation"]  # the test fold: subject 1
    assert summary.loc["all", "num_scans"] == 2 and list(summary.index) == ["all", "rotation"]
    assert (table["runtime_s"] > 0).all() and (table["ddf_s"] > 0).all()
    with h5py.File(out / "metrics.h5", "r") as file:
        for name in ("GPE", "GLE", "LPE", "LLE", "time_elapsed"):
            assert file[name].shape == (2,)
        np.testing.assert_array_equal(file["GPE"][()], table["GPE"].to_numpy())
        assert file["frame_errors/sub001__LH_rotation/global"].shape == (23,)
    for stem in ("001_LH_rotation", "001_RH_rotation"):
        for kind in ("trajectory", "drift"):
            assert (out / "plots" / f"{stem}_{kind}.png").stat().st_size > 1000
    # The DDFs on disk, compared with the ground truth the official way, give the table's errors.
    refs, scans, calibration = tiny_scans
    scan = scans[2]
    assert scan.key == "sub001__LH_rotation"
    height, width = scan.frame_size
    points = tf.reference_image_points([height, width], [height, width])
    scale = torch.as_tensor(np.array(calibration.scale), dtype=torch.float32)
    tforms = torch.from_numpy(scan.tforms.astype(np.float64))
    calib_r_t = torch.as_tensor(np.array(calibration.calib_R_T))
    true_gp, true_gl = cal_global_ddfs(tf.global_transforms(tforms, calib_r_t).float(), scale, points, scan.landmarks,
                                       width, height)
    true_lp, true_ll = cal_local_ddfs(tf.local_transforms(tforms, calib_r_t).float(), scale, points, scan.landmarks,
                                      width, height)
    with h5py.File(out / "ddfs" / "001_LH_rotation.h5", "r") as file:
        assert file["GP"].shape == (23, 3, height * width) and file["GP"].dtype == np.float32
        official = {"GPE": metrics.cal_dist(true_gp, file["GP"][()]), "LPE": metrics.cal_dist(true_lp, file["LP"][()]),
                    "GLE": metrics.cal_dist(true_gl, file["GL"][()], "landmark"),
                    "LLE": metrics.cal_dist(true_ll, file["LL"][()], "landmark")}
    for name, value in official.items():
        assert abs(table.loc[0, name] - value) < 1e-4, name


def test_ground_truth_checkpoint_scores_one_and_rerun_replaces(tiny_root, tiny_scans, tmp_path, monkeypatch, capsys):
    refs, scans, calibration = tiny_scans
    ckpt = write_checkpoint(tmp_path / "run" / "best.pt", tiny_root, pred_type="transform")
    double = GroundTruthNet(scans, calibration.calib_R_T, 2, 1)
    monkeypatch.setattr(generate_DDF, "model_from_checkpoint", lambda checkpoint, device: double)
    out = tmp_path / "eval"
    _, summary = generate_DDF.main(["--ckpt", str(ckpt), "--split", "all", "--out", str(out), "--plots"])
    assert summary.loc["all", "num_scans"] == 4
    assert summary.loc["all", "final_mean"] == pytest.approx(1.0, abs=1e-7)
    for name in ("GPE", "GLE", "LPE", "LLE"):
        assert summary.loc["all", f"{name}_mean"] < 1e-6
    assert "final" in capsys.readouterr().out
    (out / "stale.txt").write_text("from an older run")
    generate_DDF.main(["--ckpt", str(ckpt), "--split", "test", "--out", str(out)])
    assert not (out / "plots").exists() and not (out / "stale.txt").exists()
    assert len(pd.read_csv(out / "scores.csv")) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval", "run"]  # nothing left beside it
    assert (out / RESULTS_MARKER).exists() and (out / "log.txt").read_text().count("[2/2]") == 1


def test_nan_predictions_are_refused_before_anything_is_written(tiny_root, tmp_path):
    ckpt = write_checkpoint(tmp_path / "run" / "best.pt", tiny_root, "test_nan")
    with pytest.raises(ValueError, match="not finite"):
        generate_DDF.main(["--ckpt", str(ckpt), "--save_ddfs", "--plots"])
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["best.pt"]
    # A previous result in the output folder survives a failed run untouched.
    good = write_checkpoint(tmp_path / "good" / "best.pt", tiny_root)
    out, _ = generate_DDF.main(["--ckpt", str(good), "--out", str(tmp_path / "eval")])
    before = (out / "scores.csv").read_bytes()
    with pytest.raises(ValueError, match="not finite"):
        generate_DDF.main(["--ckpt", str(ckpt), "--out", str(out), "--save_ddfs"])
    assert (out / "scores.csv").read_bytes() == before and not (out / "ddfs").exists()


def test_validation_test_layout_and_another_dataset_use_all_scans(tiny_root, tiny_test_root, tmp_path):
    ckpt = write_checkpoint(tmp_path / "run" / "best.pt", tiny_root)
    out, summary = generate_DDF.main(["--ckpt", str(ckpt), "--data_path", str(tiny_test_root)])
    assert out.name == f"generate-all-{tiny_test_root.name}"
    table = pd.read_csv(out / "scores.csv")
    assert table["key"].tolist() == ["sub000__LH_rotation", "sub000__RH_rotation"]  # from dataset_keys.h5
    assert (table["final"] == 0).all()  # identity model
    with pytest.raises(ValueError, match="val_folds"):
        generate_DDF.main(["--ckpt", str(ckpt), "--split", "val"])


def test_select_scans_rules(tiny_root):
    refs = find_scans(tiny_root)
    checkpoint = {"folds": [[0], [1]], "options": {"test_folds": [1], "val_folds": [0]}}
    assert [r.subject for r in generate_DDF.select_scans(refs, checkpoint, "val")[0]] == [0, 0]
    assert generate_DDF.select_scans(refs, checkpoint, "test")[1] == "test"
    assert generate_DDF.select_scans(refs, {"options": {}}, "test")[1] == "all"  # no folds recorded
    other = {"folds": [[0], [7]], "options": {"test_folds": [1]}}
    assert generate_DDF.select_scans(refs, other, "test", same_root=False) == (refs, "all")


def test_real_plus_scans_report_landmark_metrics_as_absent(realdata_dir, tiny_root, tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "run" / "best.pt", tiny_root)
    out, summary = generate_DDF.main(["--ckpt", str(ckpt), "--data_path", str(realdata_dir / "plus_bone_l14"),
                                      "--plots"])
    table = pd.read_csv(out / "scores.csv")
    assert len(table) == 1 and table.loc[0, "height"] == 616 and table.loc[0, "width"] == 820
    assert table[["GLE", "LLE", "final"]].isna().all(axis=None) and table.loc[0, "GPE"] > 0
    assert table.loc[0, "pixel"] == 0.0  # identity model: the pixel score exists and is 0
    with h5py.File(out / "metrics.h5", "r") as file:
        assert np.isnan(file["GLE"][()]).all()
    assert "absent" in capsys.readouterr().out
    assert (out / "plots" / "000_BoneUltrasound_L14_drift.png").exists()

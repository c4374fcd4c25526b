"""train.py end to end on the simulator's `tiny` preset: every output/label type, overfitting, exact
resume, the run folder's files and checkpoints, bad options, and DDP with two CPU processes."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import models
import train
from options.core import load_preset
from options.train_options import TrainOptions
from simulation.dataset import generate_dataset
from utils import transform as tf
from utils.checkpoint import load_checkpoint

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """4 subjects x 2 scans x 24 frames of 120x160 (2 training folds, 1 validation, 1 test)."""
    root = tmp_path_factory.mktemp("tiny")
    generate_dataset(root, "tiny", seed=3, subjects=4)
    return root


def base_args(data: Path, out: Path, *extra: str) -> list[str]:
    """A run small enough for a test: 64x80 network input, 4 folds of one subject each."""
    return [
        "--DATA_PATH", str(data), "--out_dir", str(out), "--device", "cpu", "--num_workers", "0",
        "--num_folds", "4", "--train_folds", "0,1", "--val_folds", "2", "--test_folds", "3",
        "--downsample", "2", "--MINIBATCH_SIZE", "4", "--samples_per_scan", "2", "--val_samples_per_scan", "2",
        "--NUM_EPOCHS", "1", "--val_scan_every", "1", "--log_every_steps", "1", "--model_name", "efficientnet_b1",
        *extra,
    ]


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


ALLOWED = [(pred, label) for pred, labels in tf.ALLOWED_PRED_LABEL.items() for label in labels]


@pytest.mark.parametrize("pred_type,label_type", ALLOWED)
def test_a_few_steps_for_every_allowed_output_and_label_type(tiny_data, tmp_path, pred_type, label_type):
    result = train.run(base_args(tiny_data, tmp_path, "--PRED_TYPE", pred_type, "--LABEL_TYPE", label_type,
                                 "--name", f"smoke-{pred_type}-{label_type}"))
    # 2 training subjects x 2 scans x 2 windows = 8 windows -> 2 steps of 4.
    assert result.step == 2 and result.epoch == 1
    assert len(result.losses) == 2 and all(math.isfinite(loss) for loss in result.losses)
    rows = read_metrics(result.run_dir)
    assert [int(row["epoch"]) for row in rows] == [0, 1]  # untrained network, then one epoch
    for row in rows:
        assert float(row["val_dist"]) > 0
        assert float(row["val_GPE"]) > 0 and float(row["val_LPE"]) > 0
        # an untrained network is not expected to beat identity, but the identity errors must be
        # the same whatever the network does
        assert float(row["val_GPE_identity"]) == float(rows[0]["val_GPE_identity"])
    checkpoint = load_checkpoint(result.run_dir / "last.pt")
    num_pairs = 1
    points = 3 * 4
    expected_dim = {"parameter": 6, "transform": 12, "quaternion": 7, "point": points}[pred_type] * num_pairs
    assert checkpoint["model_args"] == {"name": "efficientnet_b1", "in_frames": 2, "pred_dim": expected_dim}


@pytest.mark.parametrize("pred_type", ["quaternion", "point"])
def test_identity_init_starts_from_the_identity_prediction(tiny_data, tmp_path, pred_type):
    result = train.run(base_args(tiny_data, tmp_path, "--identity_init", "true", "--PRED_TYPE", pred_type,
                                 "--max_steps", "1"))
    untrained = read_metrics(result.run_dir)[0]
    # the identity errors come from utils.metrics on identity transforms, independently of the network
    assert float(untrained["val_GPE"]) == pytest.approx(float(untrained["val_GPE_identity"]), rel=1e-5)
    assert float(untrained["val_LPE"]) == pytest.approx(float(untrained["val_LPE_identity"]), rel=1e-5)


def test_run_folder_holds_resolved_options_folds_logs_curves_and_checkpoints(tiny_data, tmp_path):
    first = train.run(base_args(tiny_data, tmp_path, "--name", "files"))
    second = train.run(base_args(tiny_data, tmp_path, "--name", "files"))
    assert first.run_dir != second.run_dir  # runs never overwrite each other
    assert first.run_dir.name.endswith("-files") and second.run_dir.name.endswith("-files")
    run_dir = first.run_dir
    for name in ("options.yaml", "folds.json", "log.txt", "metrics.csv", "curves.png", "last.pt", "best.pt"):
        assert (run_dir / name).is_file(), name
    assert any((run_dir / "tb").iterdir())
    # the resolved options are a valid preset that gives the same options back
    reloaded = TrainOptions(**load_preset(TrainOptions, run_dir / "options.yaml"))
    assert reloaded.num_folds == 4 and reloaded.downsample == 2 and reloaded.data_path == str(tiny_data)
    log_text = (run_dir / "log.txt").read_text()
    assert "run folder" in log_text and "samples/s" in log_text and "ETA" in log_text
    checkpoint = load_checkpoint(run_dir / "last.pt")
    for key in ("model", "optimizer", "scheduler", "scaler", "epoch", "step", "best", "options", "model_args",
                "format_version"):
        assert key in checkpoint
    assert checkpoint["options"]["num_folds"] == 4
    assert checkpoint["folds"] == [[0], [1], [2], [3]] or sorted(sum(checkpoint["folds"], [])) == [0, 1, 2, 3]
    best = load_checkpoint(run_dir / "best.pt")
    rows = read_metrics(run_dir)
    assert best["best"]["val_dist"] == pytest.approx(min(float(row["val_dist"]) for row in rows), rel=1e-12)


def test_best_pt_can_be_the_lowest_whole_scan_gpe(tiny_data, tmp_path):
    """--best_metric val_GPE: best.pt is the epoch whose whole validation scans' GPE was lowest, among the
    epochs that scored whole scans (every 2nd here), whatever the windows' point distance said."""
    result = train.run(base_args(tiny_data, tmp_path, "--NUM_EPOCHS", "4", "--val_scan_every", "2",
                                 "--best_metric", "val_GPE", "--learning_rate", "3e-3"))
    rows = read_metrics(result.run_dir)
    scored = [(float(row["val_GPE"]), int(row["epoch"])) for row in rows if row["val_GPE"] not in ("", "nan")]
    assert [epoch for _, epoch in scored] == [0, 2, 4]
    best = load_checkpoint(result.run_dir / "best.pt")
    assert best["best"]["val_GPE"] == pytest.approx(min(scored)[0], rel=1e-12)
    assert best["best"]["epoch"] == min(scored)[1] == best["epoch"]
    assert "best val_GPE" in (result.run_dir / "log.txt").read_text()


def test_training_overfits_a_handful_of_windows():
    """The loss of 4 fixed windows falls by more than an order of magnitude in 60 steps.

    The network runs in eval mode (no dropout, fixed batch-norm statistics) so that what is tested
    is the wiring of labels, predictions and loss, not how noisy a 4-sample batch makes training.
    """
    torch.manual_seed(0)
    generator = np.random.default_rng(0)
    tforms = torch.from_numpy(np.stack([np.eye(4)] * 8))
    for k in range(1, 8):  # steps of ~4 mm and ~0.1 rad, varying by 25 %
        step = tf.params_to_matrix(torch.from_numpy(np.concatenate(
            [generator.normal(0.1, 0.02, 3), generator.normal(4.0, 1.0, 3)])))
        tforms[k] = tforms[k - 1] @ step
    frames = torch.from_numpy(generator.integers(0, 255, (8, 32, 40), dtype=np.uint8))
    windows = [(k, k + 1) for k in range(0, 8, 2)]
    batch_frames = torch.stack([frames[list(w)] for w in windows]).float() / 255
    batch_tforms = torch.stack([tforms[list(w)] for w in windows])
    scale = torch.diag(torch.tensor([0.2, 0.2, 1.0, 1.0], dtype=torch.float64))
    geometry = train.PairGeometry(tf.pair_samples(2, 1), "parameter", "point", torch.eye(4, dtype=torch.float64),
                                  scale @ tf.image_corners((32, 40)).double())
    import models

    model = models.build_model("efficientnet_b1", 2, geometry.pred_dim()).eval()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    labels = geometry.labels(batch_tforms)
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.mse_loss(geometry.predictions(model(batch_frames)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.1 * losses[0], (losses[0], losses[-3:])


def test_resume_continues_exactly_as_an_uninterrupted_run(tiny_data, tmp_path):
    # 8 windows per epoch -> 2 steps per epoch with batches of 4; 3 epochs = 6 steps, stop after 3
    # (inside the second epoch).
    args = base_args(tiny_data, tmp_path, "--NUM_EPOCHS", "3", "--val_scan_every", "0", "--seed", "7")
    uninterrupted = train.run(args + ["--name", "whole"])
    stopped = train.run(args + ["--name", "stopped", "--max_steps", "3"])
    assert stopped.step == 3 and stopped.losses == uninterrupted.losses[:3]
    at_stop = load_checkpoint(stopped.run_dir / "last.pt")
    assert (at_stop["epoch"], at_stop["batch_in_epoch"], at_stop["step"]) == (1, 1, 3)
    resumed = train.run(["--resume", str(stopped.run_dir / "last.pt"), "--max_steps", "100"])
    assert resumed.run_dir == stopped.run_dir
    assert resumed.step == uninterrupted.step == 6
    assert resumed.losses == uninterrupted.losses[3:]  # bit for bit: same batches, same dropout draws
    end_whole = load_checkpoint(uninterrupted.run_dir / "last.pt")
    end_resumed = load_checkpoint(stopped.run_dir / "last.pt")
    assert end_resumed["step"] == end_whole["step"] and end_resumed["epoch"] == end_whole["epoch"]
    for key, value in end_whole["model"].items():
        assert torch.equal(value, end_resumed["model"][key]), key
    state_whole, state_resumed = end_whole["optimizer"]["state"], end_resumed["optimizer"]["state"]
    assert state_whole.keys() == state_resumed.keys()
    for index in state_whole:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(state_whole[index][name], state_resumed[index][name])
    rows = read_metrics(stopped.run_dir)
    assert [int(row["epoch"]) for row in rows] == [0, 1, 2, 3]  # the resumed run appends


def test_resume_refuses_changing_the_model(tiny_data, tmp_path):
    stopped = train.run(base_args(tiny_data, tmp_path, "--max_steps", "1", "--val_scan_every", "0"))
    with pytest.raises(ValueError, match="num_samples"):
        train.run(["--resume", str(stopped.run_dir / "last.pt"), "--NUM_SAMPLES", "3"])


def test_init_weights_loads_weights_only(tiny_data, tmp_path):
    source = train.run(base_args(tiny_data, tmp_path, "--name", "source", "--val_scan_every", "0"))
    started = train.run(base_args(tiny_data, tmp_path, "--name", "started", "--max_steps", "1", "--val_scan_every", "0",
                                  "--init_weights", str(source.run_dir / "last.pt")))
    assert started.step == 1  # optimiser and step count start afresh
    rows = read_metrics(started.run_dir)
    source_rows = read_metrics(source.run_dir)
    # validation of the untrained network of the new run is that of the source's final weights
    assert float(rows[0]["val_dist"]) == pytest.approx(float(source_rows[-1]["val_dist"]), rel=1e-5)


def test_non_finite_loss_stops_the_run_with_a_message(tiny_data, tmp_path):
    with pytest.raises(FloatingPointError, match="loss is (nan|inf)"):
        train.run(base_args(tiny_data, tmp_path, "--LEARNING_RATE", "1e30", "--NUM_EPOCHS", "3",
                            "--val_scan_every", "0", "--optimizer", "adam", "--PRED_TYPE", "transform",
                            "--LABEL_TYPE", "point"))


def test_bad_options_are_refused_before_anything_is_written(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="PRED_TYPE='point'"):
        train.run(base_args(tiny_data, tmp_path, "--PRED_TYPE", "point", "--LABEL_TYPE", "parameter"))
    with pytest.raises(SystemExit):
        train.run(base_args(tiny_data, tmp_path, "--NUM_SAMPLE", "3"))  # misspelt flag
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


@pytest.mark.slow
def test_torchrun_with_two_cpu_processes(tiny_data, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TUSREC_DDP_BACKEND="gloo")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO_ROOT / "train.py"), *base_args(tiny_data, tmp_path, "--name", "ddp", "--NUM_EPOCHS", "2",
                                                      "--samples_per_scan", "3")]
    finished = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    runs = sorted(tmp_path.glob("*-ddp"))
    assert len(runs) == 1  # rank 0 made the folder, rank 1 used it
    checkpoint = load_checkpoint(runs[0] / "last.pt")
    # 2 subjects x 2 scans x 3 windows = 12 windows per epoch, split over 2 ranks: 6 each, 2 steps of 4
    # (the last one of 2) per rank per epoch -> 4 steps in 2 epochs.
    assert checkpoint["step"] == 4 and checkpoint["epoch"] == 2
    rows = read_metrics(runs[0])
    assert [int(row["epoch"]) for row in rows] == [0, 1, 2]
    log_text = (runs[0] / "log.txt").read_text()
    assert "processes: 2" in log_text
    assert log_text.count("run folder") == 1  # only rank 0 logs


# --------------------------------------------------------------------------------------------
# Per-DOF diagnosis, label statistics and the normalised in-plane loss (issue 11)
# --------------------------------------------------------------------------------------------


def _independent_label_statistics(data: Path, subjects: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of [a_Z, a_Y, a_X, t_x, t_y, t_z] of every consecutive pair of the subjects' scans,
    from the DESIGN.md formula and scipy's intrinsic ZYX angles (not utils.transform)."""
    from scipy.spatial.transform import Rotation

    from utils.calibration import load_calibration
    from utils.challenge_data import ScanFile, find_scans

    calib = np.array(load_calibration(data / "calib_matrix.csv").calib_R_T, dtype=np.float64)
    values = []
    for ref in find_scans(data):
        if ref.subject not in subjects:
            continue
        with ScanFile(ref) as scan_file:
            tforms = np.asarray(scan_file.read_tforms(), dtype=np.float64)
        for i in range(1, len(tforms)):
            tform = np.linalg.inv(calib) @ np.linalg.inv(tforms[i - 1]) @ tforms[i] @ calib  # T_{i-1<-i}
            angles = Rotation.from_matrix(tform[:3, :3]).as_euler("ZYX")
            values.append(np.concatenate([angles, tform[:3, 3]]))
    values = np.array(values)
    return values.mean(axis=0), values.std(axis=0, ddof=1)


def test_patch_flow_run_diagnoses_every_dof_and_stores_label_statistics(tiny_data, tmp_path):
    result = train.run(base_args(tiny_data, tmp_path, "--model_name", "patch_flow", "--downsample", "1",
                                 "--LABEL_TYPE", "parameter", "--label_norm", "true", "--loss_dofs", "in_plane",
                                 "--identity_init", "true", "--num_patches", "8", "--patch_size", "48",
                                 "--search_radius", "6", "--robust_iterations", "2", "--loss", "l1"))
    rows = read_metrics(result.run_dir)
    for row in rows:
        for dof in tf.DOF_NAMES:
            assert float(row[f"val_{dof}_identity"]) > 0
        # patch_flow predicts no out-of-plane motion: its errors there are exactly no motion's
        for dof in ("ry", "rx", "tz"):
            assert float(row[f"val_{dof}"]) == pytest.approx(float(row[f"val_{dof}_identity"]), rel=1e-9)
        assert row["val_oop_sign_acc"] in ("", "nan")  # nothing predicted, nothing scored
    checkpoint = load_checkpoint(result.run_dir / "last.pt")
    kwargs = checkpoint["model_args"]["kwargs"]
    assert kwargs["pixel_mm"] == pytest.approx([0.229389190673828 * 4, 0.220979690551758 * 4])
    # The patch options reach the network, and a checkpoint rebuilds it with them.
    assert (kwargs["num_patches"], kwargs["patch_size"], kwargs["radius"], kwargs["robust_iterations"],
            kwargs["patch_selection"]) == (8, 48, 6, 2, "speckle")
    rebuilt = models.build_from_args(checkpoint["model_args"])
    assert (rebuilt.num_patches, rebuilt.patch_size, rebuilt.radius, rebuilt.robust_iterations) == (8, 48, 6, 2)
    folds = checkpoint["folds"]
    mean, std = _independent_label_statistics(tiny_data, folds[0] + folds[1])
    np.testing.assert_allclose(checkpoint["label_stats"]["mean"], mean, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(checkpoint["label_stats"]["std"], std, rtol=1e-6)
    log_text = (result.run_dir / "log.txt").read_text()
    assert "per DOF, validation error / no motion's: rz" in log_text


def test_the_command_line_exits_when_training_ends_with_loader_workers(tiny_data, tmp_path):
    """Workers ignore SIGTERM (a group-wide stop is the parent's to handle), so if they are not
    stopped explicitly, torch's fallback at exit (SIGTERM, then join) waits for ever: this run hung
    after its last epoch until the loaders were shut down at the end of training."""
    args = base_args(tiny_data, tmp_path, "--num_workers", "1", "--NUM_EPOCHS", "1")
    finished = subprocess.run([sys.executable, "train.py", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=180)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "finished at epoch 1" in finished.stderr + finished.stdout


def test_a_run_with_mirrored_and_gain_jittered_windows_trains(tiny_data, tmp_path, monkeypatch):
    """The options reach the training set (every window mirrored here) and the run completes."""
    seen = []
    original = train.FrameWindowDataset.__getitem__

    def spy(self, key):
        if self.flip_prob == 1.0:
            seen.append(self.window_draw(*key)[1:])
        return original(self, key)

    monkeypatch.setattr(train.FrameWindowDataset, "__getitem__", spy)
    result = train.run(base_args(tiny_data, tmp_path, "--flip_prob", "1", "--gain_jitter", "0.1"))
    rows = read_metrics(result.run_dir)
    assert all(math.isfinite(float(row["val_loss"])) for row in rows)
    assert seen and all(mirrored and 0.9 <= gain <= 1.1 for mirrored, gain in seen)


def test_label_loss_weights_are_inverse_variances_of_the_compared_dofs():
    stats = {"mean": [0.0] * 6, "std": [0.002, 0.01, 0.02, 0.1, 0.2, 0.5]}
    options = TrainOptions(label_type="parameter", label_norm=True, loss_dofs="in_plane")
    weights = train.label_loss_weights(stats, options)
    expected = torch.tensor([1 / 0.002**2, 0, 0, 1 / 0.1**2, 1 / 0.2**2, 0], dtype=torch.float32)
    torch.testing.assert_close(weights, expected)
    plain_in_plane = train.label_loss_weights(stats, TrainOptions(label_type="parameter", loss_dofs="in_plane"))
    torch.testing.assert_close(plain_in_plane, torch.tensor([1.0, 0, 0, 1, 1, 0]))


@pytest.mark.parametrize("weighted", [False, True])
def test_l1_loss_is_the_mean_absolute_error_in_units_of_each_dof_s_spread(weighted):
    """With per-DOF MSE weights 1/std^2, the L1 loss weighs each absolute error by 1/std."""
    std = torch.tensor([0.01, 1.0, 1.0, 0.3, 0.6, 1.0])
    geometry = train.PairGeometry(pairs=torch.tensor([[0, 1]]), pred_type="parameter", label_type="parameter",
                                  calib_R_T=torch.eye(4, dtype=torch.float64),
                                  image_points_mm=torch.ones(4, 4, dtype=torch.float64),
                                  loss_weights=1 / std**2 if weighted else None, loss_kind="l1")
    torch.manual_seed(0)
    predictions, labels = torch.randn(5, 1, 6), torch.randn(5, 1, 6)
    scale = 1 / std if weighted else torch.ones(6)
    expected = float(sum(abs(float(p - q)) * float(scale[k]) for row_p, row_q in zip(predictions[:, 0], labels[:, 0])
                         for k, (p, q) in enumerate(zip(row_p, row_q))) / 30)
    assert float(geometry.loss(predictions, labels)) == pytest.approx(expected, rel=1e-6)
    mse = train.PairGeometry(**{**geometry.__dict__, "loss_kind": "mse"})
    assert float(mse.loss(predictions, labels)) == pytest.approx(
        float((((predictions - labels) * scale) ** 2).mean()), rel=1e-6)
    mixed = train.PairGeometry(**{**geometry.__dict__, "loss_kind": "l1_oop_mse"})
    # [a_Z, a_Y, a_X, t_x, t_y, t_z]: the absolute error in plane, the squared one out of it.
    squared = [False, True, True, False, False, True]
    expected = float(sum((float(p - q) * float(scale[k])) ** 2 if squared[k] else abs(float(p - q)) * float(scale[k])
                         for row_p, row_q in zip(predictions[:, 0], labels[:, 0])
                         for k, (p, q) in enumerate(zip(row_p, row_q))) / 30)
    assert float(mixed.loss(predictions, labels)) == pytest.approx(expected, rel=1e-6)


def test_l1_oop_mse_predicts_the_mean_out_of_plane_motion_when_the_direction_is_in_doubt():
    """Labels whose out-of-plane part is +1 for 70 % of the pairs and -1 for 30 % (the direction in doubt),
    in-plane 0 or 10 (a pair beyond the search): the best constant prediction under l1_oop_mse is the
    mean out of plane (0.4) and the median in plane (0); under l1 it is +1 out of plane."""
    geometry = train.PairGeometry(pairs=torch.tensor([[0, 1]]), pred_type="parameter", label_type="parameter",
                                  calib_R_T=torch.eye(4, dtype=torch.float64),
                                  image_points_mm=torch.ones(4, 4, dtype=torch.float64), loss_kind="l1_oop_mse")
    labels = torch.zeros(10, 1, 6)
    labels[:7, 0, [1, 2, 5]], labels[7:, 0, [1, 2, 5]] = 1.0, -1.0
    labels[0, 0, [0, 3, 4]] = 10.0
    candidates = torch.linspace(-1, 1, 201)

    def best(kind: str, dof: int) -> float:
        losses = []
        for value in candidates:
            prediction = torch.zeros(10, 1, 6)
            prediction[..., dof] = value
            losses.append(float(train.PairGeometry(**{**geometry.__dict__, "loss_kind": kind})
                                .value_losses(prediction, labels)[..., dof].mean()))
        return float(candidates[int(np.argmin(losses))])

    for dof in (1, 2, 5):
        assert best("l1_oop_mse", dof) == pytest.approx(0.4, abs=1e-6)
        assert best("l1", dof) == pytest.approx(1.0, abs=1e-6)
    for dof in (0, 3, 4):
        assert best("l1_oop_mse", dof) == pytest.approx(0.0, abs=1e-6)


def test_dof_errors_are_absolute_errors_in_degrees_and_mm():
    points = torch.tensor([[0.0, 100.0, 0.0, 100.0], [0.0, 0.0, 80.0, 80.0], [0.0] * 4, [1.0] * 4],
                          dtype=torch.float64)
    geometry = train.PairGeometry(pairs=torch.tensor([[0, 1]]), pred_type="parameter", label_type="parameter",
                                  calib_R_T=torch.eye(4, dtype=torch.float64), image_points_mm=points)
    labels = torch.tensor([[[0.01, -0.02, 0.03, 0.5, -0.4, 0.3]], [[-0.01, 0.0, 0.0, 0.1, 0.0, -0.2]]])
    predictions = torch.tensor([[[0.012, 0.0, 0.0, 0.4, -0.4, 0.0]], [[-0.01, 0.0, 0.0, 0.3, 0.1, 0.0]]])
    sums = geometry.dof_errors(predictions, labels)
    difference = (predictions - labels).abs().reshape(-1, 6).double()
    expected = difference.sum(dim=0)
    expected[:3] = torch.rad2deg(expected[:3])
    torch.testing.assert_close(sums["abs_error"], expected, atol=1e-6, rtol=1e-5)
    truth = labels.abs().reshape(-1, 6).double().sum(dim=0)
    truth[:3] = torch.rad2deg(truth[:3])
    torch.testing.assert_close(sums["abs_true"], truth, atol=1e-6, rtol=1e-5)
    assert sums["pairs"] == 2 and sums["sign_scored"] == 0  # no out-of-plane prediction to score

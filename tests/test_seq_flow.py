"""The sequence model (issue 12): consecutive window pairs, overlapping whole-scan windows, seq_flow
against its encoder, the accumulated (drift) loss against an explicit chain, options, and a user's
path end to end: train stage 2 from a patch_flow checkpoint, generate_DDF.py, predict_ddfs,
reconstruct.py --ckpt."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import generate_DDF
import models
import predict_ddfs as entry
import reconstruct
import reference as ref
import train
from models.patch_flow import PatchFlowNet
from models.seq_flow import decorrelation_grid
from simulation.dataset import generate_dataset
from test_prediction import CALIB, POINTS_MM, TrueModel, encode, predict, random_poses
from utils import transform as tf
from utils.checkpoint import load_checkpoint
from utils.errors import InputError
from utils.prediction import predict_scan_transforms, sequence_windows


def test_consecutive_pairs_are_every_local_pair_and_need_num_pred_one_less():
    assert tf.consecutive_pairs(4).tolist() == [[0, 1], [1, 2], [2, 3]]
    assert tf.window_pairs("consecutive", 3, 2).tolist() == [[0, 1], [1, 2]]
    assert tf.window_pairs("baseline", 3, 2).tolist() == tf.pair_samples(3, 2).tolist()
    with pytest.raises(ValueError, match="NUM_PRED must be NUM_SAMPLES-1 = 3"):
        tf.window_pairs("consecutive", 4, 1)
    with pytest.raises(ValueError, match="not one of"):
        tf.window_pairs("every", 4, 3)


@pytest.mark.parametrize("num_frames,num_samples", [(2, 2), (9, 2), (10, 3), (31, 5), (32, 8), (100, 32), (33, 32)])
def test_sequence_windows_take_every_step_from_the_window_it_is_most_central_in(num_frames, num_samples):
    starts, window = sequence_windows(num_frames, num_samples)
    starts = starts.tolist()
    assert starts[0] == 0 and starts[-1] == num_frames - num_samples and starts == sorted(set(starts))
    assert len(window) == num_frames - 1
    middle = (num_samples - 2) / 2
    for step in range(num_frames - 1):  # step row k is the pair (k, k + 1) of the scan
        chosen = starts[int(window[step])]
        assert 0 <= step - chosen <= num_samples - 2
        # brute force over every window that holds the step: none is nearer its middle
        candidates = [abs(step - s - middle) for s in starts if 0 <= step - s <= num_samples - 2]
        assert abs(step - chosen - middle) == min(candidates)


class ConsecutiveTrueModel(TrueModel):
    """``TrueModel`` predicting every consecutive pair of its window."""

    def __init__(self, poses, num_samples, pred_type):
        super().__init__(poses, num_samples, num_samples - 1, pred_type)
        self.pairs = tf.consecutive_pairs(num_samples)


@pytest.mark.parametrize("pred_type", ["parameter", "transform", "quaternion", "point"])
@pytest.mark.parametrize("num_samples", [2, 5, 8])
def test_a_perfect_sequence_model_gives_the_true_transforms(num_samples, pred_type):
    poses = random_poses(23, seed=num_samples)
    model = ConsecutiveTrueModel(poses, num_samples, pred_type)
    global_pred, local_pred = predict(model, 23, num_samples, num_samples - 1, pred_type, window_pairs="consecutive")
    # independent: every T_{0<-i} and T_{i-1<-i} straight from the poses (DESIGN.md section 2), numpy
    tforms = poses.numpy()
    calib = np.asarray(ref.REAL_CALIB_R_T)
    for i in range(1, 23):
        assert_close(global_pred[i - 1].numpy(), ref.frame_to_frame(tforms, calib, 0, i), rtol=1e-9, atol=1e-7)
        assert_close(local_pred[i - 1].numpy(), ref.frame_to_frame(tforms, calib, i - 1, i), rtol=1e-9, atol=1e-7)
    assert model.calls and all(shape[1] == num_samples for shape in model.calls)


def speckle_scan(num_frames: int, height: int = 48, width: int = 64, seed: int = 0) -> torch.Tensor:
    """uint8 [N, H, W]: a smoothed random texture drifting by a pixel or two per frame, with a change
    of brightness, so that every pair has something to correlate and something to decorrelate."""
    gen = torch.Generator().manual_seed(seed)
    texture = torch.rand(1, 1, height + 40, width + 40, generator=gen)
    texture = torch.nn.functional.avg_pool2d(texture, 3, stride=1, padding=1)[0, 0]
    frames = []
    for k in range(num_frames):
        dy, dx = (k * 2) % 17, (k * 3) % 19
        noise = 0.05 * torch.rand(height, width, generator=gen)
        frames.append(texture[dy:dy + height, dx:dx + width] + noise)
    frames = torch.stack(frames)
    return (255 * (frames - frames.min()) / (frames.max() - frames.min())).round().to(torch.uint8)


SMALL = dict(pixel_mm=[0.2, 0.25], patch_size=16, num_patches=6, radius=3, robust_iterations=1)


def test_untrained_seq_flow_predicts_its_encoder_s_motion_of_each_pair():
    torch.manual_seed(0)
    model = models.build_model("seq_flow", 6, 30, **SMALL).eval()
    encoder = PatchFlowNet(**{key: value for key, value in SMALL.items()})
    encoder.load_state_dict(model.encoder.state_dict())
    encoder.eval()
    frames = speckle_scan(6).float().div(255)[None]
    with torch.no_grad():
        out = model(frames).reshape(5, 6)
        pairs = torch.stack([frames[0, :-1], frames[0, 1:]], dim=1)
        expected = encoder(pairs)
    assert_close(out, expected)
    assert float(out[:, [0, 3, 4]].abs().sum()) > 0  # the texture moves in plane: something was measured
    assert float(out[:, [1, 2, 5]].abs().sum()) == 0  # and no out-of-plane motion before training


def test_the_encoder_stays_fixed_and_in_eval_mode_when_frozen():
    model = models.build_model("seq_flow", 6, 30, **SMALL)
    # from construction on: train.py's --feature_cache measures the scans with the model as built, and a
    # patch grid jittered there would differ from the one prediction measures with
    assert not model.encoder.training
    scan = speckle_scan(12, seed=6)
    as_built = model.measure_scan(scan)["params"]
    assert torch.equal(as_built, model.eval().measure_scan(scan)["params"])
    model.train()
    assert not model.encoder.training and model.appearance.training
    assert not any(p.requires_grad for p in model.encoder.parameters())
    unfrozen = models.build_model("seq_flow", 6, 30, freeze_encoder=False, **SMALL).train()
    assert unfrozen.encoder.training and all(p.requires_grad for p in unfrozen.encoder.parameters())


def randomised_seq_flow(num_frames: int, seed: int = 1):
    torch.manual_seed(seed)
    model = models.build_model("seq_flow", num_frames, 6 * (num_frames - 1), **SMALL).eval()
    with torch.no_grad():  # a head that reads its inputs, so the comparisons below test the whole network
        model.head.weight.normal_(0, 0.5)
        model.head.bias.normal_(0, 0.1)
    return model


def test_whole_scan_features_give_each_window_exactly_its_own_inputs():
    length, num_frames = 10, 25
    model = randomised_seq_flow(length)
    scan = speckle_scan(num_frames)
    with torch.no_grad():
        features = model.scan_features(scan)
        starts = torch.tensor([0, 7, 11, num_frames - length])
        steps, encoder_params = model.window_inputs(features, starts)
        for w, start in enumerate(starts.tolist()):
            window_steps, window_params = model.window_steps(model.measure(scan[start:start + length].float().div(255)[None]))
            assert_close(steps[w], window_steps[0])
            assert_close(encoder_params[w], window_params[0])


def test_whole_scan_prediction_measures_each_pair_once_and_equals_running_whole_windows():
    length, num_frames = 8, 30
    model = randomised_seq_flow(length, seed=2)
    scan = speckle_scan(num_frames, seed=3)

    class Windows(torch.nn.Module):
        """The same network without its whole-scan path: prediction runs it on windows of frames."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    calls = []
    original = model.encoder.measure
    model.encoder.measure = lambda frames: calls.append(len(frames)) or original(frames)
    kwargs = dict(num_samples=length, num_pred=length - 1, pred_type="parameter", image_points_mm=POINTS_MM,
                  device="cpu", batch_size=3, window_pairs="consecutive")
    fast_global, fast_local = predict_scan_transforms(model, scan, **kwargs)
    assert sum(calls) == num_frames - 1  # each consecutive pair once (the longer offsets need no CNN)
    slow_global, slow_local = predict_scan_transforms(Windows(model), scan, **kwargs)
    assert sum(calls) > 2 * (num_frames - 1)  # overlapping windows of frames measure pairs again
    assert_close(fast_local, slow_local, rtol=1e-6, atol=1e-7)
    assert_close(fast_global, slow_global, rtol=1e-6, atol=1e-6)
    assert float((fast_local[:, :3, 3] - torch.eye(4, dtype=torch.float64)[:3, 3]).abs().max()) > 0


def test_whole_scan_prediction_from_kept_measurements_equals_measuring_the_frames_and_measures_nothing():
    """--feature_cache validation: the scan's measurements kept for training (per-frame rows, as
    ``train.measured_scans`` keeps them) predict exactly what the frames do, without the encoder."""
    length, num_frames = 8, 30
    model = randomised_seq_flow(length, seed=4)
    scan = speckle_scan(num_frames, seed=5)
    kwargs = dict(num_samples=length, num_pred=length - 1, pred_type="parameter", image_points_mm=POINTS_MM,
                  device="cpu", batch_size=3, window_pairs="consecutive")
    from_frames = predict_scan_transforms(model, scan, **kwargs)
    rows = train.as_rows(model.measure_scan(scan))
    model.encoder.measure = model.encoder.correlate = None  # measuring now would fail
    stand_in = np.broadcast_to(np.zeros((), np.uint8), tuple(scan.shape))  # only counted
    from_rows = predict_scan_transforms(model, stand_in, measurements=train.as_batch_of_one(rows), **kwargs)
    for a, b in zip(from_frames, from_rows):
        assert torch.equal(a, b)
    with pytest.raises(InputError, match="measurements of 29 frames for a scan of 30"):
        predict_scan_transforms(model, stand_in, measurements=train.as_batch_of_one(
            train.as_rows({"thumbnails": rows["thumbnails"][None, :29]})), **kwargs)
    with pytest.raises(InputError, match="measurements of a scan are what a sequence network with features_of reads"):
        predict_scan_transforms(torch.nn.Identity(), stand_in, measurements=rows, **kwargs)


def test_decorrelation_grid_averages_patches_near_each_cell_and_keeps_the_mean():
    peak = torch.tensor([[0.9, 0.1, 0.5, 0.5]])
    # two patches at the top-left and bottom-right cell centres, two at the middle
    position = torch.tensor([[[-1 / 3, -1 / 3], [1 / 3, 1 / 3], [0.0, 0.0], [0.0, 0.0]]])
    grid = decorrelation_grid(peak, position)
    assert grid.shape == (1, 10)
    assert grid[0, 9] == pytest.approx(0.5)  # the frame's mean
    assert grid[0, 0] > grid[0, 4] > grid[0, 8]  # each corner leans to the patch that lies there
    assert grid[0, 4] == pytest.approx(0.5, abs=0.02)  # the two corner patches pull the middle alike
    # the documented rule, in numpy: Gaussian weights of sigma one cell (1/3), 0.1 patch of the mean
    centre = np.array([-1 / 3, -1 / 3])
    weights = np.exp(-((position[0].numpy() - centre) ** 2).sum(axis=1) / (2 * (1 / 3) ** 2))
    expected = (weights @ peak[0].numpy() + 0.1 * 0.5) / (weights.sum() + 0.1)
    assert float(grid[0, 0]) == pytest.approx(expected, rel=1e-6)
    same = decorrelation_grid(torch.full((1, 4), 0.3), position)
    assert_close(same, torch.full((1, 10), 0.3))  # one value everywhere: every cell is that value


def explicit_drift(values: np.ndarray, truth: np.ndarray, corners_mm: np.ndarray) -> tuple[float, float]:
    """Mean corner distance of the chained predicted vs true local transforms, and of the truth vs
    the corners' start; numpy float64 with reference.rigid (independent of utils.transform)."""
    errors, identity = [], []
    for window_pred, window_true in zip(values, truth):
        pred_chain, true_chain = np.eye(4), np.eye(4)
        for step_pred, step_true in zip(window_pred, window_true):
            pred_chain = pred_chain @ ref.rigid(*step_pred[:3], step_pred[3:])
            true_chain = true_chain @ ref.rigid(*step_true[:3], step_true[3:])
            errors.extend(np.linalg.norm((pred_chain @ corners_mm - true_chain @ corners_mm)[:3], axis=0))
            identity.extend(np.linalg.norm((true_chain @ corners_mm - corners_mm)[:3], axis=0))
    return float(np.mean(errors)), float(np.mean(identity))


def test_accumulated_loss_is_the_chained_corner_error_over_no_motion_s():
    rng = np.random.default_rng(0)
    truth = np.concatenate([rng.normal(0, 0.02, (3, 7, 3)), rng.normal(0, 0.5, (3, 7, 3))], axis=-1)
    predicted = truth + np.concatenate([rng.normal(0, 0.01, (3, 7, 3)), rng.normal(0, 0.2, (3, 7, 3))], axis=-1)
    geometry = train.PairGeometry(pairs=tf.consecutive_pairs(8), pred_type="parameter", label_type="parameter",
                                  calib_R_T=CALIB, image_points_mm=POINTS_MM, accumulated_weight=0.5)
    assert geometry.consecutive
    error, identity = explicit_drift(predicted, truth, POINTS_MM.numpy())
    pred_t, true_t = torch.from_numpy(predicted), torch.from_numpy(truth)
    assert float(geometry.accumulated_error_ratio(pred_t, true_t)) == pytest.approx(error / identity, rel=1e-9)
    drift, drift_identity = geometry.accumulated_distances(pred_t, true_t)
    assert float(drift.mean()) == pytest.approx(error, rel=1e-9)
    assert float(drift_identity.mean()) == pytest.approx(identity, rel=1e-9)
    local = float(geometry.value_losses(pred_t, true_t).mean())
    assert float(geometry.loss(pred_t, true_t)) == pytest.approx(local + 0.5 * error / identity, rel=1e-9)
    assert float(geometry.accumulated_error_ratio(true_t, true_t)) == pytest.approx(0, abs=1e-9)
    assert not train.PairGeometry(pairs=tf.pair_samples(3, 2), pred_type="parameter", label_type="parameter",
                                  calib_R_T=CALIB, image_points_mm=POINTS_MM).consecutive


@pytest.mark.parametrize("extra,message", [
    (["--model_name", "seq_flow", "--NUM_SAMPLES", "6", "--NUM_PRED", "5", "--LABEL_TYPE", "parameter"],
     "model_name='seq_flow' predicts the parameters of every consecutive pair"),
    (["--window_pairs", "consecutive", "--NUM_SAMPLES", "6", "--NUM_PRED", "2", "--SAMPLE_RANGE", "6"],
     "num_pred must be num_samples-1 = 5"),
    (["--accumulated_loss_weight", "1"], "accumulating needs window_pairs='consecutive'"),
    (["--accumulated_loss_weight", "nan", "--window_pairs", "consecutive"], "must be a finite number >= 0"),
    (["--seq_hidden", "32"], "options of model_name='seq_flow' only"),
    (["--model_name", "seq_flow", "--window_pairs", "consecutive", "--NUM_SAMPLES", "6", "--NUM_PRED", "5",
      "--SAMPLE_RANGE", "6", "--LABEL_TYPE", "parameter", "--feature_cache", "true", "--flip_prob", "0.5"],
     r"feature_cache=True measures each scan once, as it is: no frame augmentation \(got \{'flip_prob': 0.5\}\)"),
    (["--model_name", "seq_flow", "--window_pairs", "consecutive", "--NUM_SAMPLES", "6", "--NUM_PRED", "5",
      "--SAMPLE_RANGE", "6", "--LABEL_TYPE", "parameter", "--feature_cache", "true", "--freeze_encoder", "false"],
     "feature_cache=True caches what a fixed encoder measures"),
    (["--model_name", "seq_flow", "--window_pairs", "consecutive", "--NUM_SAMPLES", "4", "--NUM_PRED", "3",
      "--SAMPLE_RANGE", "4", "--LABEL_TYPE", "parameter"], r"seq_offsets=\[1, 2, 4\]: expected distinct frame distances"),
])
def test_sequence_options_are_validated(tmp_path, extra, message):
    with pytest.raises(InputError, match=message):
        train.run(["--DATA_PATH", str(tmp_path), "--out_dir", str(tmp_path / "out"), *extra])
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_seq")
    generate_dataset(root, "tiny", seed=5, subjects=4)
    return root


def common_args(data, out):
    return ["--DATA_PATH", str(data), "--out_dir", str(out), "--device", "cpu", "--num_workers", "0",
            "--num_folds", "4", "--train_folds", "0,1", "--val_folds", "2", "--test_folds", "3",
            "--LABEL_TYPE", "parameter", "--label_norm", "true", "--loss", "l1", "--identity_init", "true",
            "--patch_size", "32", "--num_patches", "8", "--search_radius", "6", "--NUM_EPOCHS", "1",
            "--val_scan_every", "1", "--log_every_steps", "1", "--val_samples_per_scan", "1"]


@pytest.mark.slow
def test_stage_two_trains_from_a_patch_flow_checkpoint_and_predicts_through_every_entry_point(
        tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "results"
    stage1 = train.run(common_args(tiny_data, out) + ["--model_name", "patch_flow", "--name", "stage1",
                                                      "--MINIBATCH_SIZE", "8", "--samples_per_scan", "4"])
    args = common_args(tiny_data, out) + [
        "--model_name", "seq_flow", "--window_pairs", "consecutive", "--NUM_SAMPLES", "8", "--SAMPLE_RANGE", "8",
        "--NUM_PRED", "7", "--accumulated_loss_weight", "1", "--MINIBATCH_SIZE", "2", "--samples_per_scan", "1",
        "--init_weights", str(stage1.run_dir / "last.pt")]
    augmentation = ["--reverse_prob", "0.5", "--max_stride", "2", "--flip_prob", "0.5", "--gain_jitter", "0.1"]
    stage2 = train.run(args + augmentation + ["--name", "stage2"])
    assert stage2.step == 2 and all(math.isfinite(loss) for loss in stage2.losses)
    checkpoint = load_checkpoint(stage2.run_dir / "last.pt")
    first = load_checkpoint(stage1.run_dir / "last.pt")["model"]
    # the encoder kept stage 1's weights (frozen), the rest was trained
    for key, value in first.items():
        assert torch.equal(checkpoint["model"][f"encoder.{key}"], value), key
    assert checkpoint["model_args"]["name"] == "seq_flow" and checkpoint["model_args"]["pred_dim"] == 42
    rows = (stage2.run_dir / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    last = dict(zip(header, rows[-1].split(",")))
    assert float(last["val_window_drift"]) > 0 and float(last["val_window_drift_identity"]) > 0
    assert 0 <= float(last["val_oop_sign_acc"]) <= 1 and float(last["val_GPE"]) > 0

    # the same stage 2 on cached measurements: trains, and its encoder is stage 1's too
    cached = train.run(args + ["--feature_cache", "true", "--name", "stage2-cached"])
    assert cached.step == 2 and all(math.isfinite(loss) for loss in cached.losses)
    cached_checkpoint = load_checkpoint(cached.run_dir / "last.pt")
    assert all(torch.equal(cached_checkpoint["model"][f"encoder.{key}"], value) for key, value in first.items())
    # its whole-scan validation read the measurements kept for training: the GPE of predicting the frames
    from utils.calibration import load_calibration
    from utils.challenge_data import find_scans
    from utils.checkpoint import model_from_checkpoint
    from utils.training_data import read_folds, scans_of_folds

    val_scans = scans_of_folds(find_scans(tiny_data), read_folds(cached.run_dir / "folds.json"), [2])
    from_frames = train.evaluate_scans(model_from_checkpoint(cached_checkpoint), val_scans, val_scans, 1,
                                       load_calibration(tiny_data / "calib_matrix.csv"), torch.device("cpu"),
                                       cached_checkpoint["options"])
    cached_rows = (cached.run_dir / "metrics.csv").read_text().splitlines()
    cached_last = dict(zip(cached_rows[0].split(","), cached_rows[-1].split(",")))
    assert float(cached_last["val_GPE"]) == pytest.approx(from_frames["val_GPE"], rel=1e-9)

    # generate_DDF.py on the test fold, unchanged
    result_dir, summary = generate_DDF.main(["--ckpt", str(stage2.run_dir / "last.pt"), "--split", "test"])
    header = (result_dir / "scores.csv").read_text().splitlines()[0].split(",")
    assert {"GPE", "oop_sign_agree", "oop_sign_counted", "oop_moving_pairs"} <= set(header) and summary is not None
    assert "Out-of-plane sign accuracy of the seq_flow checkpoint's prediction" in (result_dir / "tables.txt").read_text()

    # predict_ddfs, as the challenge harness calls it
    entry.clear_cache()
    monkeypatch.setenv(entry.CHECKPOINT_ENV, str(stage2.run_dir / "last.pt"))
    from utils.challenge_data import find_scans, read_scan

    scan_ref = find_scans(tiny_data)[0]
    scan = read_scan(scan_ref)
    landmark = scan.landmarks if getattr(scan, "landmarks", None) is not None else np.array([[1, 5, 5]])
    fields = entry.predict_ddfs(scan.frames, landmark, str(tiny_data / "calib_matrix.csv"), "cpu")
    n, h, w = scan.frames.shape
    assert fields[0].shape == (n - 1, 3, h * w) and all(np.isfinite(f).all() for f in fields)
    entry.clear_cache()

    # reconstruct.py --ckpt
    volume_dir = reconstruct.main(["--data", str(tiny_data), "--scan", f"{scan_ref.subject:03d}/{scan_ref.name}",
                                   "--ckpt", str(stage2.run_dir / "last.pt"), "--out", str(tmp_path / "volumes"),
                                   "--spacing", "1.0"])
    assert any(volume_dir.rglob("*.mha")) or any(volume_dir.rglob("*.nii*")) or any(volume_dir.rglob("*.npy"))


@pytest.mark.slow
def test_cached_measurements_under_torchrun_with_two_cpu_processes(tiny_data, tmp_path):
    """--feature_cache with DDP: both ranks measure (the same numbers: the encoder is fixed and in eval
    mode), both may write the same cache files (atomically), rank 0 validates whole scans from its own."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    cache = tmp_path / "cache"
    args = common_args(tiny_data, tmp_path / "results") + [
        "--model_name", "seq_flow", "--window_pairs", "consecutive", "--NUM_SAMPLES", "8", "--SAMPLE_RANGE", "8",
        "--NUM_PRED", "7", "--MINIBATCH_SIZE", "2", "--samples_per_scan", "2", "--NUM_EPOCHS", "2",
        "--feature_cache", "true", "--cache_dir", str(cache), "--best_metric", "val_GPE", "--name", "ddp"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TUSREC_DDP_BACKEND="gloo")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(repo / "train.py"), *args]
    finished = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    run_dir = next((tmp_path / "results").glob("*-ddp"))
    # one whole file per scan (2 training subjects and 1 validation subject of 2 scans), no temporaries left
    files = sorted((cache / "measurements").iterdir())
    assert len(files) == 6 and all(f.suffix == ".pt" and not f.name.startswith(".") for f in files)
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert len(rows) == 4 and all(float(dict(zip(header, row.split(",")))["val_GPE"]) > 0 for row in rows[1:])
    log_text = (run_dir / "log.txt").read_text()
    assert "processes: 2" in log_text and "best val_GPE" in log_text
    assert load_checkpoint(run_dir / "best.pt")["best"]["val_GPE"] > 0


def assert_same_rows(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_same_rows(a[key], b[key])
        else:
            assert torch.equal(a[key], b[key]), key


def test_measurements_kept_on_disk_are_read_back_exactly_and_renamed_by_any_change(tiny_data, tmp_path):
    import os

    from utils.challenge_data import find_scans
    from utils.training_data import MEASUREMENT_FOLDER

    refs = find_scans(tiny_data)[:2]
    cpu = torch.device("cpu")
    model = randomised_seq_flow(6, seed=2)
    fresh = train.measured_scans(model, refs, 1, cpu, "test")  # no --cache_dir: nothing on disk
    cache = tmp_path / "cache"
    written = train.measured_scans(model, refs, 1, cpu, "test", cache)
    folder = cache / MEASUREMENT_FOLDER
    assert len(list(folder.glob("*.pt"))) == 2 and len(list(folder.iterdir())) == 2  # no temporaries left

    def measured_again(*args, **kwargs):
        raise AssertionError("measured a scan whose measurements are on disk")

    model.measure_scan = measured_again  # the second run must read every scan from the files
    read = train.measured_scans(model, refs, 1, cpu, "test", cache)
    del model.measure_scan
    for a, b, c in zip(fresh.measurements, written.measurements, read.measurements):
        assert_same_rows(a, b)
        assert_same_rows(a, c)
    assert all(np.array_equal(p, q) for p, q in zip(fresh.poses, read.poses))

    # Other encoder weights, or a rewritten scan file, are measured again under new names.
    with torch.no_grad():
        model.encoder.log_sharpness.add_(0.5)
    train.measured_scans(model, refs[:1], 1, cpu, "test", cache)
    assert len(list(folder.glob("*.pt"))) == 3
    stat = os.stat(refs[0].frames_path)
    os.utime(refs[0].frames_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    train.measured_scans(model, refs[:1], 1, cpu, "test", cache)
    assert len(list(folder.glob("*.pt"))) == 4

    # A damaged file is named, not read as something else.
    for path in folder.glob("*.pt"):
        path.write_bytes(b"not a tensor file")
    with pytest.raises(InputError, match="unreadable measurement cache file.*delete it"):
        train.measured_scans(model, refs[:1], 1, cpu, "test", cache)


def test_frame_moments_are_the_brightness_and_its_weighted_centre_and_spread():
    from models.seq_flow import frame_moments

    image = torch.zeros(1, 60, 80)
    image[0, 10:20, 60:70] = 1.0  # a bright square: rows 10..19, columns 60..69
    mean, centre_x, centre_y, spread_y = frame_moments(image)[0].tolist()
    assert mean == pytest.approx(100 / (60 * 80))
    # pixel centres relative to the image: (index + 0.5) / size - 0.5
    assert centre_x == pytest.approx((65 / 80) - 0.5)
    assert centre_y == pytest.approx((15 / 60) - 0.5)
    assert spread_y == pytest.approx(np.std(np.arange(10, 20)) / 60, rel=1e-5)
    lower = torch.roll(image, 6, dims=1)  # the echoes move 6 rows down the image
    assert frame_moments(lower)[0, 2] - frame_moments(image)[0, 2] == pytest.approx(6 / 60)


def test_a_scan_measured_once_and_sliced_is_each_window_s_own_measurement():
    from utils.training_data import slice_measurements

    length, num_frames = 8, 20
    model = randomised_seq_flow(length, seed=4)
    scan = speckle_scan(num_frames, seed=5)
    with torch.no_grad():
        whole = model.measure_scan(scan)
        whole = {"grids": {k: v[0] for k, v in whole["grids"].items()}, "params": whole["params"][0],
                 "thumbnails": whole["thumbnails"][0]}
        for start in (0, 5, num_frames - length):
            frames = scan[start:start + length].float().div(255)[None]
            own = model.measure(frames)
            cut = slice_measurements(whole, start, length, num_frames)
            for k in model.offsets:
                assert_close(cut["grids"][k], own["grids"][k][0])
            assert_close(cut["params"], own["params"][0])
            assert_close(cut["thumbnails"], own["thumbnails"][0])
            batch = {"grids": {k: v[None] for k, v in cut["grids"].items()}, "params": cut["params"][None],
                     "thumbnails": cut["thumbnails"][None]}
            assert_close(model(batch), model(frames))  # the network reads a cached window as its frames


def test_without_a_learned_appearance_the_moments_alone_are_read():
    model = models.build_model("seq_flow", 6, 30, appearance_dim=0, **SMALL).eval()
    assert model.appearance is None
    assert not any(name.startswith("appearance") for name, _ in model.named_parameters())
    frames = speckle_scan(6).float().div(255)[None]
    with torch.no_grad():
        steps, _ = model.window_steps(model.measure(frames))
    # 3 in-plane values, 10 grid values per offset, then change and mean of the 4 moments
    assert steps.shape == (1, 5, 3 + 10 * len(model.offsets) + 2 * 4)
    assert torch.isfinite(model(frames)).all()

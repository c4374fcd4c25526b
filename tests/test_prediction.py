"""Whole-scan inference against a model double that returns the true transforms of its windows."""

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import reference as ref
from utils import transform as tf
from utils.prediction import compose_plan, predict_scan_transforms, window_plan

HEIGHT, WIDTH = 8, 10
CALIB = torch.as_tensor(ref.REAL_CALIB_R_T, dtype=torch.float64)
POINTS_MM = torch.as_tensor(ref.REAL_SCALE, dtype=torch.float64) @ tf.image_corners((HEIGHT, WIDTH)).double()

SETTINGS = [(ns, npred) for ns in (2, 3, 4, 5) for npred in range(1, ns)]


def random_poses(num_frames, seed=0):
    """Tracker poses [N, 4, 4] (tool -> camera) of a wandering probe: every frame moves."""
    gen = torch.Generator().manual_seed(seed)
    steps = torch.cat([0.05 * torch.randn(num_frames, 3, generator=gen, dtype=torch.float64),
                       2.0 * torch.randn(num_frames, 3, generator=gen, dtype=torch.float64)], dim=1)
    poses = [tf.params_to_matrix(torch.tensor([0.3, -0.2, 0.1, 100.0, 50.0, 20.0], dtype=torch.float64))]
    for step in steps[1:]:
        poses.append(poses[-1] @ tf.params_to_matrix(step))
    return torch.stack(poses)


def encode(tform, pred_type):
    """Per-pair network values [..., D] of transforms [..., 4, 4] (the labels a perfect model outputs)."""
    if pred_type == "parameter":
        return tf.matrix_to_params(tform)
    if pred_type == "transform":
        return tf.matrix_to_transform12(tform)
    if pred_type == "quaternion":
        return tf.matrix_to_quaternion(tform)
    return tf.transform_points(tform, POINTS_MM).flatten(-2)  # [3, P] row-major


class TrueModel(torch.nn.Module):
    """A test double: reads the frame indices encoded in its input (frame k is the constant k / 255)
    and returns the true ``T_{j<-i}`` of every pair of each window, as ``pred_type`` values."""

    def __init__(self, poses, num_samples, num_pred, pred_type, identity=False, nan_window_start=None):
        super().__init__()
        self.poses, self.pred_type, self.identity = poses, pred_type, identity
        self.pairs = tf.pair_samples(num_samples, num_pred)
        self.nan_window_start = nan_window_start
        self.calls = []

    def forward(self, x):
        self.calls.append(x.shape)
        assert x.dtype == torch.float32 and x.ndim == 4 and 0 <= x.min() and x.max() <= 1
        index = torch.round(x[:, :, 0, 0] * 255).long()  # [B, num_samples]
        assert torch.all(x == x[:, :, :1, :1]), "each frame is one constant image"
        assert torch.all(index[:, 1:] - index[:, :-1] == 1), "windows are consecutive frames"
        frame_pairs = index[:, self.pairs]  # [B, M, 2] scan frame indices (j, i)
        if self.identity:
            tforms = torch.eye(4, dtype=torch.float64).expand(*frame_pairs.shape[:2], 4, 4)
        else:
            tforms = tf.relative_transforms(self.poses, frame_pairs.reshape(-1, 2), CALIB)
        out = encode(tforms, self.pred_type).reshape(len(x), -1)
        if self.nan_window_start is not None:
            out[index[:, 0] == self.nan_window_start, 0] = float("nan")
        return out


def scan_frames(num_frames):
    return np.broadcast_to(np.arange(num_frames, dtype=np.uint8)[:, None, None], (num_frames, HEIGHT, WIDTH))


def predict(model, num_frames, ns, npred, pred_type, **kwargs):
    kwargs.setdefault("batch_size", 4)
    return predict_scan_transforms(model, scan_frames(num_frames), num_samples=ns, num_pred=npred,
                                   pred_type=pred_type, image_points_mm=POINTS_MM, device="cpu", **kwargs)


@pytest.mark.parametrize("pred_type", tf.PRED_TYPES)
@pytest.mark.parametrize(("ns", "npred"), SETTINGS)
def test_a_perfect_model_gives_the_true_transforms(ns, npred, pred_type):
    num_frames = 13
    poses = random_poses(num_frames, seed=ns * 10 + npred)
    model = TrueModel(poses, ns, npred, pred_type)
    global_pred, local_pred = predict(model, num_frames, ns, npred, pred_type)
    assert global_pred.dtype == local_pred.dtype == torch.float64
    assert not global_pred.is_inference() and not local_pred.is_inference()
    assert global_pred.shape == local_pred.shape == (num_frames - 1, 4, 4)
    assert_close(global_pred, tf.global_transforms(poses, CALIB), atol=1e-6, rtol=0)
    assert_close(local_pred, tf.local_transforms(poses, CALIB), atol=1e-6, rtol=0)
    # every frame has its own pose: none repeats the previous one (the baseline's tail for NUM_SAMPLES > 2)
    steps = (global_pred[1:] - global_pred[:-1]).abs().flatten(1).amax(dim=1)
    assert bool((steps > 1e-3).all())
    assert not torch.allclose(local_pred[-1], torch.eye(4, dtype=torch.float64))


@pytest.mark.parametrize("pred_type", tf.PRED_TYPES)
@pytest.mark.parametrize(("ns", "npred"), [(2, 1), (4, 1), (5, 3)])
def test_an_identity_model_gives_identity_transforms(ns, npred, pred_type):
    model = TrueModel(None, ns, npred, pred_type, identity=True)
    global_pred, local_pred = predict(model, 9, ns, npred, pred_type)
    eye = torch.eye(4, dtype=torch.float64).expand(8, 4, 4)
    assert_close(global_pred, eye, atol=1e-12, rtol=0)
    assert_close(local_pred, eye, atol=1e-12, rtol=0)


@pytest.mark.parametrize(("ns", "npred"), SETTINGS)
@pytest.mark.parametrize("num_frames", [5, 6, 17])
def test_the_plan_places_every_frame_once_from_its_nearest_placed_frame(ns, npred, num_frames):
    if num_frames < ns:
        return
    pairs = tf.pair_samples(ns, npred)
    plan = window_plan(num_frames, ns, pairs)
    frame = torch.arange(1, num_frames)
    starts = plan.starts[plan.window]
    a, b = pairs[plan.pair, 0], pairs[plan.pair, 1]
    assert bool((plan.starts[1:] > plan.starts[:-1]).all()) and 0 <= int(plan.starts[0])
    assert int(plan.starts[-1]) <= num_frames - ns
    # the edge connects the frame and its parent in the window named
    moving = torch.where(plan.inverted, starts + a, starts + b)
    other = torch.where(plan.inverted, starts + b, starts + a)
    assert torch.equal(moving, frame) and torch.equal(other, plan.parent)
    first_moving = ns - npred
    # frames that are a pair's moving frame use the local pair (i-1, i), except the first, which hangs on frame 0
    late = frame > first_moving
    assert torch.equal(plan.parent[late], frame[late] - 1) and not bool(plan.inverted[late].any())
    assert int(plan.parent[first_moving - 1]) == 0 and not bool(plan.inverted[first_moving - 1])
    # the early frames no pair moves hang on the first moving frame through an inverted pair of window 0
    early = frame < first_moving
    assert bool(plan.inverted[early].all()) and bool((plan.parent[early] == first_moving).all())
    # only the windows needed run: one per npred frames, not one per frame
    assert plan.num_windows == 1 + math.ceil((num_frames - ns) / npred)
    assert set(plan.window.tolist()) == set(range(plan.num_windows))


def test_num_samples_2_uses_every_window_for_its_local_pair():
    plan = window_plan(6, 2, tf.pair_samples(2, 1))
    assert plan.starts.tolist() == [0, 1, 2, 3, 4]
    assert plan.window.tolist() == [0, 1, 2, 3, 4] and plan.parent.tolist() == [0, 1, 2, 3, 4]


def test_a_scan_shorter_than_a_window_is_refused():
    with pytest.raises(ValueError, match="shorter than one window of NUM_SAMPLES=4"):
        window_plan(3, 4, tf.pair_samples(4, 1))
    with pytest.raises(ValueError, match="0 <= a < b < num_samples=3"):
        window_plan(5, 3, [[1, 1]])


def test_compose_plan_equals_a_sequential_chain():
    gen = torch.Generator().manual_seed(3)
    local = tf.params_to_matrix(torch.randn(37, 6, generator=gen, dtype=torch.float64))
    parent = torch.arange(37)
    expected, current = [], torch.eye(4, dtype=torch.float64)
    for step in local:
        current = current @ step
        expected.append(current)
    assert_close(compose_plan(local, parent), torch.stack(expected), atol=1e-10, rtol=0)


@pytest.mark.parametrize(("ns", "npred", "pred_type"), [(2, 1, "parameter"), (4, 2, "transform"), (5, 1, "point")])
def test_batch_size_does_not_change_the_result_and_windows_are_batched(ns, npred, pred_type):
    num_frames = 20
    poses = random_poses(num_frames, seed=7)
    results = {}
    for batch_size in (1, 7):
        model = TrueModel(poses, ns, npred, pred_type)
        results[batch_size] = predict(model, num_frames, ns, npred, pred_type, batch_size=batch_size)
        num_windows = window_plan(num_frames, ns, tf.pair_samples(ns, npred)).num_windows
        assert len(model.calls) == math.ceil(num_windows / batch_size)
        assert all(shape[0] <= batch_size for shape in model.calls)
        assert sum(shape[0] for shape in model.calls) == num_windows
    for got, expected in zip(results[7], results[1]):
        assert_close(got, expected, atol=1e-12, rtol=0)


def test_non_finite_output_names_the_window():
    poses = random_poses(12)
    model = TrueModel(poses, 3, 1, "parameter", nan_window_start=5)
    with pytest.raises(ValueError, match=r"not finite for scan window 5 \(frames 5\.\.7\)"):
        predict(model, 12, 3, 1, "parameter")


def test_model_mode_is_restored_and_tensor_frames_are_accepted():
    poses = random_poses(6)
    model = TrueModel(poses, 2, 1, "quaternion").train()
    frames = torch.from_numpy(scan_frames(6).copy())
    global_pred, _ = predict_scan_transforms(model, frames, num_samples=2, num_pred=1, pred_type="quaternion",
                                             image_points_mm=None, device="cpu")
    assert model.training
    assert_close(global_pred, tf.global_transforms(poses, CALIB), atol=1e-6, rtol=0)


def test_bad_inputs_are_refused():
    model = TrueModel(random_poses(6), 2, 1, "parameter")
    with pytest.raises(ValueError, match="frames must be uint8"):
        predict_scan_transforms(model, scan_frames(6).astype(np.float32), num_samples=2, num_pred=1,
                                pred_type="parameter", image_points_mm=None, device="cpu")
    # a model trained with NUM_SAMPLES=2 asked to predict for NUM_SAMPLES=3 windows
    with pytest.raises(ValueError, match=r"output \(3, 6\) .* expected \[3, 36\] = 3 pairs x 12 'transform' values"):
        predict(model, 6, 3, 2, "transform")
    with pytest.raises(ValueError, match="pred_type='euler'"):
        predict(model, 6, 2, 1, "euler")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_with_autocast_matches_cpu():
    torch.manual_seed(0)
    from models import build_model

    num_frames, ns, npred = 15, 3, 2
    frames = np.random.default_rng(0).integers(0, 256, (num_frames, 64, 80), dtype=np.uint8)
    model = build_model("efficientnet_b0", ns, tf.type_dim("parameter", 4, len(tf.pair_samples(ns, npred))))
    model.classifier[1].weight.data.mul_(1e-2)  # small motions, like a trained pose network
    kwargs = dict(num_samples=ns, num_pred=npred, pred_type="parameter", image_points_mm=POINTS_MM, batch_size=4)
    cpu = predict_scan_transforms(model.eval(), frames, device="cpu", **kwargs)
    gpu = predict_scan_transforms(model.cuda(), frames, device="cuda", **kwargs)
    amp = predict_scan_transforms(model, frames, device="cuda", amp_dtype=torch.bfloat16, **kwargs)
    assert gpu[0].device.type == "cpu" and gpu[0].dtype == torch.float64
    assert_close(gpu[0], cpu[0], atol=1e-3, rtol=1e-3)
    assert_close(amp[1], cpu[1], atol=5e-2, rtol=5e-2)

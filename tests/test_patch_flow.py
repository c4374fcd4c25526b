"""PatchFlow (models/patch_flow.py): its correlation, sub-pixel peak and rigid fit against independent
formulas, and the untrained network measuring known motions of synthetic speckle."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import models
from models.patch_flow import (local_soft_argmax, normalised_cross_correlation, robust_rigid_fit_2d,
                               weighted_median, weighted_rigid_fit_2d)
from utils import transform as tf

PIXEL_MM = (0.229389190673828, 0.220979690551758)  # the challenge calibration's S


def speckle(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Fully developed speckle-like texture: the envelope of smoothed complex noise, float64."""
    rng = np.random.default_rng(seed)
    field = rng.normal(size=(height, width)) + 1j * rng.normal(size=(height, width))
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.fftfreq(width)[None, :]
    psf = np.exp(-(fx**2 + fy**2) / (2 * 0.12**2))  # grains of a few pixels, as at 6 MHz
    return np.abs(np.fft.ifft2(np.fft.fft2(field) * psf))


def fourier_shift(image: np.ndarray, shift_x: float, shift_y: float) -> np.ndarray:
    """``image`` moved by a (sub-pixel) shift: out(u) = image(u - shift), band-limited and exact."""
    fy = np.fft.fftfreq(image.shape[0])[:, None]
    fx = np.fft.fftfreq(image.shape[1])[None, :]
    phase = np.exp(-2j * np.pi * (fx * shift_x + fy * shift_y))
    return np.real(np.fft.ifft2(np.fft.fft2(image) * phase))


def test_correlation_peaks_at_the_integer_shift_with_value_one():
    image = torch.from_numpy(speckle(128, 128))
    size, radius = 64, 8
    fixed = image[30:30 + size, 40:40 + size]
    # B's content at u is A's at u + (dx, dy): B(u) = image[30 + dy + u_y, 40 + dx + u_x] = A(u + d).
    dx, dy = 3, -5
    moving = image[30 + dy:30 + dy + size, 40 + dx:40 + dx + size]
    surface = normalised_cross_correlation(moving[None], fixed[None], radius)[0]
    row, col = divmod(int(surface.argmax()), 2 * radius + 1)
    assert (col - radius, row - radius) == (dx, dy)
    assert float(surface.max()) == pytest.approx(1.0, abs=1e-4)  # the 1e-6 guards against 0 / 0
    assert float(surface.min()) >= -1 - 1e-6


def test_local_soft_argmax_finds_a_sub_pixel_peak():
    radius = 6
    shifts = torch.arange(-radius, radius + 1, dtype=torch.float64)
    grid_y, grid_x = torch.meshgrid(shifts, shifts, indexing="ij")
    grid = torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1)
    peaks = torch.tensor([[1.3, -2.2], [0.0, 0.0], [-3.45, 4.1]], dtype=torch.float64)
    # Gaussian log-scores of width 0.5 px: their softmax is a sampled Gaussian whose mean is the peak.
    logits = -((grid_x[None] - peaks[:, 0, None, None]) ** 2 + (grid_y[None] - peaks[:, 1, None, None]) ** 2) / 0.5
    found = local_soft_argmax(logits, grid, reach=2)
    # A Gaussian this narrow sampled at integers has a mean a few hundredths off its peak; integer
    # (arg)max would be off by up to 0.5.
    assert_close(found, peaks, atol=0.03, rtol=0)


def test_local_soft_argmax_stays_inside_the_map_at_its_edge():
    radius = 4
    shifts = torch.arange(-radius, radius + 1, dtype=torch.float32)
    grid_y, grid_x = torch.meshgrid(shifts, shifts, indexing="ij")
    grid = torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1)
    logits = torch.full((1, 9, 9), -10.0)
    logits[0, 0, 8] = 10.0  # the corner shift (x=+4, y=-4)
    found = local_soft_argmax(logits, grid, reach=2)
    assert_close(found, torch.tensor([[4.0, -4.0]]), atol=1e-3, rtol=0)


@pytest.mark.parametrize("seed", range(3))
def test_weighted_rigid_fit_recovers_an_in_plane_transform_exactly(seed):
    generator = torch.Generator().manual_seed(seed)
    batch, count = 4, 9
    points = torch.rand(batch, count, 2, generator=generator, dtype=torch.float64) * 140
    angle = (torch.rand(batch, generator=generator, dtype=torch.float64) - 0.5) * 0.2
    translation = (torch.rand(batch, 2, generator=generator, dtype=torch.float64) - 0.5) * 6
    zero = torch.zeros(batch, dtype=torch.float64)
    params = torch.stack([angle, zero, zero, translation[:, 0], translation[:, 1], zero], dim=1)
    homogeneous = torch.cat([points, torch.zeros(batch, count, 1, dtype=torch.float64),
                             torch.ones(batch, count, 1, dtype=torch.float64)], dim=-1)
    # Independent reference: the conventions module's matrix moves the points.
    targets = (tf.params_to_matrix(params) @ homogeneous.transpose(1, 2)).transpose(1, 2)[..., :2]
    weights = torch.rand(batch, count, generator=generator, dtype=torch.float64)
    weights = weights / weights.sum(dim=1, keepdim=True)
    found_angle, found_translation = weighted_rigid_fit_2d(points, targets, weights)
    assert_close(found_angle, angle, atol=1e-12, rtol=0)
    assert_close(found_translation, translation, atol=1e-10, rtol=0)


def test_weighted_rigid_fit_ignores_a_point_of_zero_weight():
    points = torch.tensor([[[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [50.0, 50.0]]], dtype=torch.float64)
    targets = points + torch.tensor([1.0, 2.0], dtype=torch.float64)
    targets[0, 3] += 30.0  # an outlier
    weights = torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0.0]], dtype=torch.float64)
    angle, translation = weighted_rigid_fit_2d(points, targets, weights)
    assert abs(float(angle)) < 1e-12
    assert_close(translation, torch.tensor([[1.0, 2.0]], dtype=torch.float64), atol=1e-12, rtol=0)


def _rigid_points_with_outliers(seed: int, count: int = 40, outliers: int = 10, noise_mm: float = 0.02):
    """Patch centres (float64 [1, K, 2] mm) and where a known in-plane motion takes them, with small
    measurement noise and ``outliers`` of them displaced by 1.5 to 4 mm more, in directions within
    30 degrees of one another (tissue that moved otherwise, or matches fooled by the same structure:
    errors in random directions would largely cancel in the plain fit). Returns ``(points, targets,
    angle, translation)``."""
    generator = torch.Generator().manual_seed(seed)
    points = torch.rand(1, count, 2, generator=generator, dtype=torch.float64) * 140
    angle = torch.tensor([0.02], dtype=torch.float64)  # about a degree: a fast frame-to-frame turn
    translation = torch.tensor([[0.4, -0.7]], dtype=torch.float64)
    cos, sin = math.cos(0.02), math.sin(0.02)
    rotation = torch.tensor([[cos, -sin], [sin, cos]], dtype=torch.float64)
    targets = points @ rotation.T + translation[:, None]
    targets = targets + noise_mm * torch.randn(1, count, 2, generator=generator, dtype=torch.float64)
    common = float(torch.rand(1, generator=generator, dtype=torch.float64)) * 2 * math.pi
    direction = common + (torch.rand(outliers, generator=generator, dtype=torch.float64) - 0.5) * math.radians(60)
    length = 1.5 + 2.5 * torch.rand(outliers, generator=generator, dtype=torch.float64)
    targets[0, :outliers] += length[:, None] * torch.stack([direction.cos(), direction.sin()], dim=-1)
    return points, targets, angle, translation


@pytest.mark.parametrize("seed", range(3))
def test_robust_fit_recovers_the_motion_despite_outlier_patches(seed):
    points, targets, angle, translation = _rigid_points_with_outliers(seed)
    weights = torch.full((1, points.shape[1]), 1 / points.shape[1], dtype=torch.float64)
    plain_angle, plain_translation = weighted_rigid_fit_2d(points, targets, weights)
    # A quarter of the patches off by millimetres pulls the least-squares fit by half a millimetre.
    assert float((plain_translation - translation).norm()) > 0.4
    # Five passes: the first fit is off by so much that the inliers' residuals are large too, and the
    # cut-off closes in over several passes (three leave some seeds a tenth of a millimetre off).
    found_angle, found_translation, final = robust_rigid_fit_2d(points, targets, weights, 5, min_scale=0.02)
    # Down to the measurement noise (0.02 mm per point, 30 inliers, angle ~1e-4 rad): the outliers
    # weigh nothing.
    assert_close(found_angle, angle, atol=3e-4, rtol=0)
    assert_close(found_translation, translation, atol=0.02, rtol=0)
    assert float(final[0, :10].max()) == 0.0
    assert_close(final.sum(dim=1), torch.ones(1, dtype=torch.float64))


def test_robust_fit_with_no_iteration_is_the_plain_fit_bit_for_bit():
    points, targets, _, _ = _rigid_points_with_outliers(0)
    weights = torch.softmax(torch.randn(1, points.shape[1], dtype=torch.float64), dim=1)
    angle, translation, final = robust_rigid_fit_2d(points, targets, weights, 0, min_scale=0.02)
    plain_angle, plain_translation = weighted_rigid_fit_2d(points, targets, weights)
    assert torch.equal(angle, plain_angle) and torch.equal(translation, plain_translation)
    assert final is weights


def test_robust_fit_is_differentiable():
    """It runs in training: gradients reach the displacements and the weights (the confidences)."""
    points, targets, _, _ = _rigid_points_with_outliers(1, count=12, outliers=3)
    weights = torch.softmax(torch.randn(1, 12, dtype=torch.float64), dim=1).requires_grad_()
    targets.requires_grad_()

    def fit(targets, weights):
        angle, translation, _ = robust_rigid_fit_2d(points, targets, weights, 2, min_scale=0.02)
        return angle, translation

    assert torch.autograd.gradcheck(fit, (targets, weights))


def test_weighted_median_counts_each_value_by_its_weight():
    values = torch.tensor([[3.0, 1.0, 2.0, 10.0], [5.0, 4.0, 6.0, 7.0]])
    assert_close(weighted_median(values, torch.full((2, 4), 0.25)), torch.tensor([2.0, 5.0]))
    # A value of (almost) no weight does not count, however many such values there are.
    weights = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.1, 0.1, 0.1, 0.7]])
    assert_close(weighted_median(values, weights), torch.tensor([10.0, 7.0]))


def _untrained(**kwargs):
    model = models.build_model("patch_flow", 2, 6, pixel_mm=list(PIXEL_MM), **kwargs)
    model.init_at_identity()
    return model.eval()


@pytest.mark.parametrize(("shift_x", "shift_y"), [(0.0, 0.0), (1.4, -0.6), (-2.25, 3.5)])
def test_untrained_network_measures_a_known_translation(shift_x, shift_y):
    """Frame B is frame A moved by (-dx, -dy) pixels, so B's content at u is A's at u + (dx, dy):
    ``T_{A<-B}`` is a translation by (dx * S_x, dy * S_y) mm and no rotation. Untrained, the
    soft-argmax leans towards the integer peak by up to ~0.2 px (training removes that); a sign or
    axis mix-up, or a pixel size applied to the wrong axis, is off by far more."""
    image = speckle(240, 320, seed=1)
    frame_a = image
    frame_b = fourier_shift(image, -shift_x, -shift_y)
    pair = np.stack([frame_a, frame_b])
    pair = (pair - pair.min()) / (pair.max() - pair.min())
    with torch.no_grad():
        out = _untrained(num_patches=16)(torch.from_numpy(pair).float()[None])
    assert out.shape == (1, 6)
    assert abs(math.degrees(float(out[0, 0]))) < 0.02
    assert float(out[0, 3]) == pytest.approx(shift_x * PIXEL_MM[0], abs=0.25 * PIXEL_MM[0])
    assert float(out[0, 4]) == pytest.approx(shift_y * PIXEL_MM[1], abs=0.25 * PIXEL_MM[1])


def test_robust_network_ignores_a_region_that_moved_otherwise():
    """Frame B is frame A moved by (2, -1) px, except its left 96 columns (a third of the patches),
    where the tissue moved by (-4, 3) px. Those patches match well, so the plain correlation-weighted
    fit lands between the two motions; three biweight passes drop them and find the frame's motion.
    The squares are ranked by texture, the setting this case was designed with (the speckle rule
    finds every square of this synthetic speckle alike and may take more of them from the region)."""
    image = speckle(240, 320, seed=3)
    frame_b = fourier_shift(image, -2.0, 1.0)
    frame_b[:, :96] = fourier_shift(image, 4.0, -3.0)[:, :96]
    pair = np.stack([image, frame_b])
    pair = torch.from_numpy((pair - pair.min()) / (pair.max() - pair.min())).float()[None]
    with torch.no_grad():
        plain = _untrained(num_patches=32, patch_selection="texture")(pair)[0]
        robust = _untrained(num_patches=32, patch_selection="texture", robust_iterations=3)(pair)[0]
    expected_mm = torch.tensor([2.0 * PIXEL_MM[0], -1.0 * PIXEL_MM[1]])
    assert float((plain[3:5] - expected_mm).norm()) > 0.2  # mm: about a pixel off
    assert abs(math.degrees(float(robust[0]))) < 1e-3
    assert_close(robust[3:5], expected_mm, atol=0.02 * PIXEL_MM[0], rtol=0)  # a fiftieth of a pixel


def test_robust_iterations_zero_is_the_network_as_before():
    """Existing checkpoints (no robust_iterations in their model_args) rebuild to the same outputs,
    and the option adds no weights: one state dict loads into any setting."""
    torch.manual_seed(0)
    default = models.build_model("patch_flow", 2, 6, pixel_mm=list(PIXEL_MM)).eval()
    explicit = models.build_model("patch_flow", 2, 6, pixel_mm=list(PIXEL_MM), robust_iterations=0).eval()
    robust = models.build_model("patch_flow", 2, 6, pixel_mm=list(PIXEL_MM), robust_iterations=2).eval()
    explicit.load_state_dict(default.state_dict())
    robust.load_state_dict(default.state_dict())
    frames = torch.rand(3, 2, 160, 224)
    with torch.no_grad():
        assert torch.equal(explicit(frames), default(frames))
        assert not torch.equal(robust(frames), default(frames))


def _frame_with_interfaces() -> torch.Tensor:
    """A 288 x 320 frame B (and A = B): speckle of mean 0.3, a bright interface (rows 100..105 at
    1.0) and black from row 224 on (outside the sector). With 64-px squares every 32 px, the
    candidate rows are 0, 32, ..., 224 (9 squares each): rows 0, 32, 128 and 160 are pure speckle,
    64 and 96 hold the interface, 192 is half black, 224 all black."""
    image = speckle(288, 320, seed=5)
    image = 0.3 * image / image.mean()
    image[100:106] = 1.0
    image[224:] = 0.0
    frame = torch.from_numpy(image.clip(0, 1)).float()
    return torch.stack([frame, frame])[None]


def _chosen_rows(model, frames) -> list[int]:
    return [int(row) for row in model._origins(frames)[0, :, 0]]


def test_speckle_selection_takes_speckle_and_leaves_bright_interfaces_last():
    """Of the 54 squares holding signal, the 36 of pure speckle come first with the speckle rule;
    ranking by texture takes the 18 with the interface first, which is what the rule avoids."""
    frames = _frame_with_interfaces()
    assert set(_chosen_rows(_untrained(num_patches=36), frames)) == {0, 32, 128, 160}
    assert set(_chosen_rows(_untrained(num_patches=18, patch_selection="texture"), frames)) == {64, 96}


def test_speckle_selection_fills_up_with_the_most_textured_of_the_rest():
    """Asked for more patches than the 54 squares holding signal, the rule takes all 54, then the
    others by variance: the half-black squares of row 192 before the black ones of row 224."""
    rows = _chosen_rows(_untrained(num_patches=63), _frame_with_interfaces())
    assert sorted(rows[:54]) == sorted([0, 32, 64, 96, 128, 160] * 9)
    assert rows[54:] == [192] * 9


def test_a_frame_without_signal_still_gets_its_patches():
    with torch.no_grad():
        origins = _untrained(num_patches=8)._origins(torch.zeros(2, 2, 240, 320))
    assert origins.shape == (2, 8, 2)


def test_predicts_no_out_of_plane_motion_at_any_frame_size():
    model = _untrained()
    for height, width in ((480, 640), (616, 820), (96, 128)):
        frames = torch.rand(3, 2, height, width)
        with torch.no_grad():
            out = model(frames)
        assert out.shape == (3, 6)
        assert torch.isfinite(out).all()
        assert (out[:, list(tf.OUT_OF_PLANE_DOFS)] == 0).all()


def test_black_frames_give_no_motion():
    """Nothing to match (e.g. frames outside the sector): the tie-breaking prior picks no shift."""
    with torch.no_grad():
        out = _untrained()(torch.zeros(2, 2, 240, 320))
    assert_close(out, torch.zeros(2, 6), atol=1e-6, rtol=0)


def test_model_args_carry_the_pixel_size_and_rebuild_it():
    args = models.model_args("patch_flow", 2, 6, pixel_mm=list(PIXEL_MM))
    assert args == {"name": "patch_flow", "in_frames": 2, "pred_dim": 6, "kwargs": {"pixel_mm": list(PIXEL_MM)}}
    model = models.build_from_args(args)
    assert_close(model.pixel_mm, torch.tensor(PIXEL_MM))
    assert models.model_args("resnet18", 2, 6) == {"name": "resnet18", "in_frames": 2, "pred_dim": 6}


def test_model_args_carry_robust_iterations_and_rebuild_it():
    args = models.model_args("patch_flow", 2, 6, pixel_mm=list(PIXEL_MM), num_patches=64, robust_iterations=3)
    assert args["kwargs"] == {"pixel_mm": list(PIXEL_MM), "num_patches": 64, "robust_iterations": 3}
    model = models.build_from_args(args)
    assert model.robust_iterations == 3 and model.num_patches == 64
    assert models.build_from_args(models.model_args("patch_flow", 2, 6)).robust_iterations == 0


def test_bad_patch_flow_arguments_are_refused():
    with pytest.raises(ValueError, match="takes no argument"):
        models.build_model("patch_flow", 2, 6, pixel_size=[0.2, 0.2])
    with pytest.raises(ValueError, match="NUM_SAMPLES=2"):
        models.build_model("patch_flow", 4, 18)
    with pytest.raises(ValueError, match="pixel_mm"):
        models.build_model("patch_flow", 2, 6, pixel_mm=[0.2, -1.0])
    with pytest.raises(ValueError, match="radius"):
        models.build_model("patch_flow", 2, 6, radius=20)
    with pytest.raises(ValueError, match="kwargs"):
        models.build_from_args({"name": "patch_flow", "in_frames": 2, "pred_dim": 6, "kwargs": [1]})
    for bad in (-1, 1.5, True, "2", None):
        with pytest.raises(ValueError, match="robust_iterations"):
            models.build_model("patch_flow", 2, 6, robust_iterations=bad)
    with pytest.raises(ValueError, match="patch_selection='edges': expected one of"):
        models.build_model("patch_flow", 2, 6, patch_selection="edges")


def test_whole_scan_prediction_batches_patch_flow_by_its_own_size():
    """Its cost per window is a fixed number of patches: the frame-size rule made for convnets
    (2 windows per pass at 480x640) would make per-call overheads dominate."""
    from utils.evaluation import CPU_BATCH_SIZE_BY_MODEL, PredictionSettings

    options = {"pred_type": "parameter", "num_samples": 2, "num_pred": 1, "model_name": "patch_flow"}
    settings = PredictionSettings.from_options(options)
    assert settings.resolved_batch_size("cpu", 480, 640) == CPU_BATCH_SIZE_BY_MODEL["patch_flow"] > 2
    assert settings.resolved_batch_size("cuda", 480, 640) == 32  # the options' inference_batch_size default
    baseline = PredictionSettings.from_options({**options, "model_name": "efficientnet_b1"})
    assert baseline.resolved_batch_size("cpu", 480, 640) == 2


def test_untrained_network_predicts_a_simulated_scan_better_than_no_motion(tmp_path):
    """On a real-size simulated scan, block matching alone already recovers in-plane motion: the
    whole-scan local error is below no motion's (training only refines this)."""
    from simulation.dataset import generate_dataset
    from utils.calibration import load_calibration
    from utils.challenge_data import find_scans
    from utils.evaluation import PredictionSettings, evaluate_scan

    generate_dataset(tmp_path, "demo", seed=4, subjects=1, frames=30)
    calibration = load_calibration(tmp_path / "calib_matrix.csv")
    scale = np.array(calibration.scale)
    model = models.build_model("patch_flow", 2, 6, pixel_mm=[float(scale[0, 0]), float(scale[1, 1])])
    model.init_at_identity()
    settings = PredictionSettings.from_options({"pred_type": "parameter", "num_samples": 2, "num_pred": 1,
                                                "model_name": "patch_flow"})
    for ref in find_scans(tmp_path):
        result = evaluate_scan(model, settings, ref, calibration, "cpu")
        assert result.errors["LPE"] < result.identity_errors["LPE"]


def test_prediction_converts_pixels_with_the_scanned_data_s_pixel_size():
    """The same frames predicted under a calibration with twice the pixel size move twice as far in
    mm (patch_flow measures pixels); the trained pixel size is restored afterwards."""
    from utils.evaluation import PredictionSettings, predict_transforms

    image = speckle(160, 200, seed=2)
    frames = np.stack([image, fourier_shift(image, -1.5, 0.0), fourier_shift(image, -3.0, 0.5)])
    frames = np.round(255 * (frames - frames.min()) / (frames.max() - frames.min())).astype(np.uint8)
    model = _untrained(num_patches=8)
    settings = PredictionSettings(pred_type="parameter", num_samples=2, num_pred=1)
    scale = np.diag([0.2, 0.25, 1.0, 1.0])
    _, local, _ = predict_transforms(model, frames, settings, scale, "cpu")
    _, local_double, _ = predict_transforms(model, frames, settings, np.diag([0.4, 0.5, 1.0, 1.0]), "cpu")
    assert float(local[0, 0, 3]) == pytest.approx(1.5 * 0.2, abs=0.25 * 0.2)
    torch.testing.assert_close(local_double[:, :3, 3], 2 * local[:, :3, 3], rtol=1e-5, atol=1e-6)
    assert_close(model.pixel_mm, torch.tensor(PIXEL_MM))

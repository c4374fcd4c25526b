"""Speckle tracking (utils/speckle.py, speckle_sign.py, speckle_scan.py) and ``generate_DDF.py --method speckle``.

Expected values are independent of the code under test: synthetic speckle moved by a known rigid
transform (sampled through scipy's spline interpolation), correlations drawn from a known curve,
sign sequences written out by hand, the no-motion errors of a simulated scan, and files on disk.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

import generate_DDF
from simulation.dataset import generate_dataset
from utils import metrics, speckle, speckle_scan, speckle_sign
from utils import transform as tf
from utils.calibration import load_calibration
from utils.challenge_data import CALIB_FILE, find_scans, read_scan
from utils.evaluation import true_transforms

SCALE = np.diag([0.229389190673828, 0.220979690551758, 1.0, 1.0])  # the challenge calibration's S
PIXEL_MM = (SCALE[0, 0], SCALE[1, 1])


def speckle_field(height: int, width: int, seed: int) -> np.ndarray:
    """Complex speckle field: white complex noise through an anisotropic Gaussian PSF (grains of ~2 x 4 px)."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((height, width)) + 1j * rng.standard_normal((height, width))
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.fftfreq(width)[None, :]
    psf = np.exp(-2 * np.pi**2 * (1.0**2 * fy**2 + 1.8**2 * fx**2))  # sigma 1.0 px (rows), 1.8 px (columns)
    return np.fft.ifft2(np.fft.fft2(noise) * psf)


def render(field: np.ndarray, tform_mm: np.ndarray, height: int, width: int, pad: int) -> np.ndarray:
    """uint8 frame whose pixel p shows the field at ``tform_mm @ S p`` (image mm, pixels from 1).

    So for frames ``(render(f, I), render(f, T))`` the true local transform ``T_{0<-1}`` is ``T``.
    The field is interpolated (cubic splines) before the envelope and log compression, as a scanner
    forms the image.
    """
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    points = np.stack([(cols + 1) * SCALE[0, 0], (rows + 1) * SCALE[1, 1], np.zeros_like(rows), np.ones_like(rows)])
    moved = np.tensordot(tform_mm, points, axes=1)
    index = [moved[1] / SCALE[1, 1] - 1 + pad, moved[0] / SCALE[0, 0] - 1 + pad]
    envelope = np.hypot(ndimage.map_coordinates(field.real, index, order=3),
                        ndimage.map_coordinates(field.imag, index, order=3))
    decibels = 20 * np.log10(envelope / np.median(envelope) + 1e-6)
    return np.clip(128 + 255 * decibels / 60, 0, 255).astype(np.uint8)


def curve_only(pixel_mm=PIXEL_MM, **fields) -> speckle.SpeckleCalibration:
    """A calibration for the in-plane tests (the out-of-plane curve is not used by the ``zero`` rule)."""
    return speckle.SpeckleCalibration((0.0, 1000.0), (1.0,), (1.0,), pixel_mm, **fields)


def in_plane_params(local: torch.Tensor) -> torch.Tensor:
    """[a_Z, t_x, t_y] of transforms [..., 4, 4]."""
    return tf.matrix_to_params(local)[..., [0, 3, 4]]


# --------------------------------------------------------------------------------------------
# In-plane motion of synthetic speckle
# --------------------------------------------------------------------------------------------


HEIGHT, WIDTH, PAD = 240, 320, 40


@pytest.fixture(scope="module")
def field():
    return speckle_field(HEIGHT + 2 * PAD, WIDTH + 2 * PAD, seed=0)


def test_sub_pixel_translation_is_recovered(field):
    # 2.34 and -1.44 pixels: both axes sub-pixel, and frame 1's content sits at p + t in frame 0.
    tform = np.eye(4)
    tform[:3, 3] = [0.537, -0.318, 0.0]
    frames = np.stack([render(field, np.eye(4), HEIGHT, WIDTH, PAD), render(field, tform, HEIGHT, WIDTH, PAD)])
    global_, local, seconds = speckle_scan.predict_scan_speckle(frames, SCALE, curve_only(), speckle.SIGN_ZERO)
    assert global_.shape == local.shape == (1, 4, 4) and global_.dtype == local.dtype == torch.float64
    assert seconds > 0
    a_z, t_x, t_y = in_plane_params(local[0]).tolist()
    assert abs(t_x - 0.537) < 0.02 and abs(t_y + 0.318) < 0.02  # mm, within ~0.1 pixel
    assert abs(a_z) < 2e-4  # radians
    torch.testing.assert_close(local[0, 2], torch.tensor([0.0, 0, 1, 0], dtype=torch.float64))  # zero rule


def test_small_in_plane_rotation_is_recovered(field):
    # 0.8 degrees about the image centre: a_Z = 0.01396 rad and t = c - R c.
    angle = math.radians(0.8)
    centre = np.array([WIDTH / 2 * SCALE[0, 0], HEIGHT / 2 * SCALE[1, 1], 0.0])
    rotation = np.array([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]])
    tform = np.eye(4)
    tform[:3, :3] = rotation
    tform[:3, 3] = centre - rotation @ centre
    frames = np.stack([render(field, np.eye(4), HEIGHT, WIDTH, PAD), render(field, tform, HEIGHT, WIDTH, PAD)])
    _, local, _ = speckle_scan.predict_scan_speckle(frames, SCALE, curve_only(), speckle.SIGN_ZERO)
    a_z, t_x, t_y = in_plane_params(local[0]).tolist()
    assert abs(a_z - angle) < 5e-4  # rad (0.03 degrees)
    assert abs(t_x - tform[0, 3]) < 0.03 and abs(t_y - tform[1, 3]) < 0.03  # mm


def test_black_patches_are_skipped_and_any_frame_size_works(field):
    """Only the left half holds signal, in a frame size unrelated to 480x640."""
    height, width = 200, 300
    tform = np.eye(4)
    tform[:3, 3] = [0.3, 0.2, 0.0]
    frames = np.stack([render(field, np.eye(4), height, width, PAD), render(field, tform, height, width, PAD)])
    frames[:, :, width // 2:] = 0
    measured = speckle.measure_pairs(frames, SCALE, speckle.SpeckleSettings())
    assert len(measured.centres_mm) > 0
    assert measured.centres_mm[:, 0].max() < width // 2 * SCALE[0, 0]  # no patch centre in the black half
    _, local, _ = speckle_scan.predict_scan_speckle(frames, SCALE, curve_only(), speckle.SIGN_ZERO)
    _, t_x, t_y = in_plane_params(local[0]).tolist()
    assert abs(t_x - 0.3) < 0.03 and abs(t_y - 0.2) < 0.03


def test_pairs_without_signal_get_the_identity():
    frames = np.zeros((3, 120, 160), np.uint8)
    global_, local, _ = speckle_scan.predict_scan_speckle(frames, SCALE, curve_only(), speckle.SIGN_CONTINUITY)
    torch.testing.assert_close(local, torch.eye(4, dtype=torch.float64).expand(2, 4, 4))
    torch.testing.assert_close(global_, local)


# --------------------------------------------------------------------------------------------
# Calibration of the decorrelation curve
# --------------------------------------------------------------------------------------------


def test_fit_recovers_a_known_curve():
    rng = np.random.default_rng(1)
    displacement = rng.uniform(-3, 3, 4000)
    peak = 0.93 * np.exp(-displacement**2 / (2 * 1.3**2)) + rng.normal(0, 0.02, displacement.shape)
    sigma, rho0 = speckle.fit_decorrelation_curve(peak, displacement)
    assert sigma == pytest.approx(1.3, rel=0.02)
    assert rho0 == pytest.approx(0.93, abs=0.005)


def test_depth_bands_get_their_own_sigma_and_sparse_bands_are_merged():
    rng = np.random.default_rng(2)
    depth = np.concatenate([rng.uniform(10, 20, 3000), rng.uniform(20, 30, 3000), rng.uniform(30, 40, 20)])
    true_sigma = np.where(depth < 20, 0.8, 1.6)
    displacement = rng.uniform(-3, 3, depth.shape)
    peak = 0.95 * np.exp(-displacement**2 / (2 * true_sigma**2)) + rng.normal(0, 0.01, depth.shape)
    edges, sigmas, rho0s, counts = speckle.fit_depth_bands(peak, displacement, depth, band_mm=10, min_samples=100)
    assert edges == [10.0, 20.0, 40.0]  # the 20 samples at 30-40 mm joined the band above them
    assert counts == [3000, 3020]
    assert sigmas[0] == pytest.approx(0.8, rel=0.03) and sigmas[1] == pytest.approx(1.6, rel=0.05)
    assert all(r == pytest.approx(0.95, abs=0.01) for r in rho0s)


def test_inverted_curve_gives_the_displacement_back():
    calibration = speckle.SpeckleCalibration((0.0, 20.0, 60.0), (0.8, 1.6), (0.95, 0.9), PIXEL_MM)
    depth = torch.tensor([5.0, 30.0, 100.0], dtype=torch.float64)  # above, inside and below the bands
    displacement = torch.tensor([0.5, 1.0, 0.7], dtype=torch.float64)
    sigma = torch.tensor([0.8, 1.6, 1.6], dtype=torch.float64)
    rho0 = torch.tensor([0.95, 0.9, 0.9], dtype=torch.float64)
    peak = rho0 * torch.exp(-displacement**2 / (2 * sigma**2))
    torch.testing.assert_close(calibration.displacement_squared(peak, depth), displacement**2)
    # Above rho0: no displacement; below the floor: clipped to it, so a finite bound.
    assert calibration.displacement_squared(torch.tensor([0.99]), torch.tensor([30.0])).item() == 0.0
    floor = 2 * 1.6**2 * math.log(0.9 / calibration.settings.rho_min)
    assert calibration.displacement_squared(torch.tensor([0.0]), torch.tensor([30.0])).item() == pytest.approx(floor)


def test_calibration_json_round_trip_and_clear_errors(tmp_path):
    calibration = speckle.SpeckleCalibration((0.0, 20.0, 60.0), (0.8, 1.6), (0.95, 0.9), PIXEL_MM,
                                             stop_threshold_mm=0.25, initial_sign=-1, turn_pairs=2, min_run_pairs=3,
                                             rock_deg=0.35, pause_pairs=6, move_signs=(1, -1),
                                             quarter_turn_deg=88.5, samples=(10, 20), num_pairs=7)
    path = calibration.save(tmp_path / "cal.json")
    assert speckle.SpeckleCalibration.load(path) == calibration
    record = json.loads(path.read_text())
    for change, message in [({"sigma_mm": [0.8, -1.0]}, "sigma_mm"), ({"band_edges_mm": [0, 20]}, "sigma_mm"),
                            ({"initial_sign": 0}, "initial_sign"), ({"format_version": 99}, "format_version"),
                            ({"pause_pairs": 2.5}, "pause_pairs"), ({"pause_pairs": -1}, "pause_pairs"),
                            ({"turn_pairs": 0}, "turn_pairs"), ({"turn_pairs": 6}, "must exceed 'turn_pairs'"),
                            ({"min_run_pairs": 0}, "min_run_pairs"), ({"rock_deg": -1}, "rock_deg"),
                            ({"move_signs": [1]}, "move_signs"), ({"move_signs": [1, 0]}, "move_signs"),
                            ({"move_signs": 1}, "move_signs"), ({"quarter_turn_deg": -5}, "quarter_turn_deg"),
                            ({"quarter_turn_deg": "ninety"}, "wrong type"),
                            ({"settings": {"patch_px": 2}}, "patch_px"), ({"colour": "red"}, "unknown")]:
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({**record, **change}))
        with pytest.raises(ValueError, match=message) as error:
            speckle.SpeckleCalibration.load(bad)
        assert str(bad) in str(error.value)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid JSON"):
        speckle.SpeckleCalibration.load(bad)
    with pytest.raises(FileNotFoundError):
        speckle.SpeckleCalibration.load(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="pixels of"):
        speckle_scan.predict_scan_speckle(np.zeros((2, 64, 64), np.uint8), SCALE * 2, calibration)
    # A calibration from before the moves rule (no pause) reads, but cannot drive that rule.
    old = {k: v for k, v in record.items()
           if k not in ("turn_pairs", "min_run_pairs", "rock_deg", "pause_pairs", "move_signs", "quarter_turn_deg")}
    bad.write_text(json.dumps(old))
    before = speckle.SpeckleCalibration.load(bad)
    assert (before.turn_pairs, before.min_run_pairs, before.rock_deg, before.pause_pairs, before.move_signs,
            before.quarter_turn_deg) == (1, 1, 0.0, 0, (1, 1), 0.0)
    before.check_rule(speckle.SIGN_CONTINUITY)
    with pytest.raises(ValueError, match="no 'pause_pairs'.*calibrate again"):
        speckle_scan.predict_scan_speckle(np.zeros((2, 64, 64), np.uint8), SCALE, before, speckle.SIGN_MOVES)


# --------------------------------------------------------------------------------------------
# Sign rules
# --------------------------------------------------------------------------------------------


def fan_planes(velocity):
    """Canonical planes of a fan (tilt about the lateral axis: d = v y) and the true ones."""
    velocity = torch.as_tensor(velocity, dtype=torch.float64)
    true = torch.stack([torch.zeros_like(velocity), torch.zeros_like(velocity), velocity], dim=-1)
    return true.abs(), true  # canonical: positive at the grid's centroid (y > 0)


GRID = torch.tensor([[1.0, x, y] for x in (10.0, 40.0, 70.0) for y in (10.0, 30.0, 50.0)], dtype=torch.float64)
GRAM = GRID.T @ GRID


def test_zero_rule_gives_no_direction():
    canonical, _ = fan_planes([0.02, 0.03, -0.01])
    signs = speckle_sign.orient_planes(canonical, torch.ones(3), GRAM, speckle.SIGN_ZERO)
    assert signs.tolist() == [0.0, 0.0, 0.0]


def test_continuity_keeps_the_direction_and_reverses_after_a_stop():
    velocity = [0.02, 0.03, 0.03, 0.001, 0.0005, -0.02, -0.03, 0.001, 0.02]
    canonical, true = fan_planes(velocity)
    magnitude = (canonical @ GRAM * canonical).sum(-1).div(len(GRID)).sqrt()
    signs = speckle_sign.orient_planes(canonical, magnitude, GRAM, speckle.SIGN_CONTINUITY, stop_threshold_mm=0.1)
    assert signs.tolist() == [1, 1, 1, 0, 0, -1, -1, 0, 1]
    agree, counted = speckle_sign.sign_agreement(canonical * signs[:, None], true, GRAM, min_rms_mm=0.1)
    assert counted.tolist() == [True, True, True, False, False, True, True, False, True]
    assert bool(agree[counted].all())
    # The first direction is a convention: the other one makes every counted pair wrong.
    flipped = speckle_sign.orient_planes(canonical, magnitude, GRAM, speckle.SIGN_CONTINUITY, 0.1, initial_sign=-1)
    assert torch.equal(flipped, -signs)
    # Without a stop below the threshold there is no reversal.
    never = speckle_sign.orient_planes(canonical, magnitude, GRAM, speckle.SIGN_CONTINUITY, stop_threshold_mm=0.0)
    assert never.tolist() == [1.0] * len(velocity)


def test_continuity_follows_a_field_whose_canonical_orientation_flips():
    # A twist (d = a (x - 40)) with a small offset whose sign changes: the canonical orientation
    # (positive at the centroid, x = 40) flips with the offset, the field's direction does not.
    true = torch.tensor([[-0.4 + 0.05, 0.01, 0.0], [-0.4 - 0.05, 0.01, 0.0], [-0.4 + 0.05, 0.01, 0.0]],
                        dtype=torch.float64)
    centroid = GRID.mean(dim=0)
    canonical = torch.where((true @ centroid)[:, None] < 0, -true, true)
    signs = speckle_sign.orient_planes(canonical, torch.ones(3), GRAM, speckle.SIGN_CONTINUITY, 0.0)
    oriented = canonical * signs[:, None]
    assert ((oriented @ GRAM * oriented[0]).sum(-1) > 0).all()


def twist_planes(rate):
    """A twist about the probe's axis (the lateral middle of the grid, x = 40): d = rate (x - 40), canonical
    and true (the canonical orientation is the one positive at the grid's centroid, here 0: any)."""
    rate = torch.as_tensor(rate, dtype=torch.float64)
    true = torch.stack([-40.0 * rate, rate, torch.zeros_like(rate)], dim=-1)
    return true.abs() * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64), true


def rms(planes):
    return (planes @ GRAM * planes).sum(-1).div(len(GRID)).sqrt()


def test_move_directions_tell_a_tilt_from_a_twist():
    tilt, _ = fan_planes([0.02, -0.03])
    twist, _ = twist_planes([0.01, -0.02])
    kinds, directions = speckle_sign.move_directions(torch.cat([tilt, twist, -tilt, -twist]), GRAM)
    assert [speckle.MOVE_KINDS[k] for k in kinds] == ["tilt"] * 2 + ["twist"] * 2 + ["tilt"] * 2 + ["twist"] * 2
    # tilt: the sign of the mean displacement (v y, y > 0); twist: the sign of the lateral slope
    assert directions.tolist() == [1, 1, 1, 1, -1, -1, -1, -1]


# A habitual operator: every fan starts towards +a_X, every twist towards -rate, whatever came before.
# Stops are pairs below 0.1 mm: a flicker of 1 pair as a move speeds up, turns of 4 and 5 pairs, pauses
# of 12 pairs between moves.
STOP, FLICKER = [0.001], [0.0005]
HABIT_VELOCITY = ([0.02] + FLICKER + [0.03, 0.03] + STOP * 4 + [-0.03, -0.02] + STOP * 5 + [0.03, 0.02]  # + - +
                  + STOP * 12 + [0.02, 0.03] + STOP * 4 + [-0.02, -0.03]  # a pause, then a fan that starts + again
                  + STOP * 12)  # a pause, then a twist
HABIT_TWIST = [-0.006, -0.008, 0.0, -0.007]  # with a flicker too
SECOND_FAN = 8 + 5 + 2 + 12


def habit_scan(fan_sign: float = 1.0, twist_sign: float = 1.0):
    """Canonical and true fields of HABIT_VELOCITY then HABIT_TWIST, each move's direction times its sign."""
    fan_canonical, fan_true = fan_planes(HABIT_VELOCITY)
    twist_canonical, twist_true = twist_planes(HABIT_TWIST)
    return torch.cat([fan_canonical, twist_canonical]), torch.cat([fan_sign * fan_true, twist_sign * twist_true])


def test_moves_rule_passes_flickers_reverses_at_turns_and_starts_each_move_the_habitual_way():
    canonical, true = habit_scan()
    magnitude = rms(canonical)
    signs = speckle_sign.orient_planes(canonical, magnitude, GRAM, speckle.SIGN_MOVES, 0.1, turn_pairs=2, pause_pairs=8,
                                  move_signs=(1, -1))
    moving = magnitude >= 0.1
    oriented = canonical * signs[:, None]
    assert torch.allclose(oriented[moving], true[moving]) and (signs[~moving] == 0).all()
    # continuity takes the flicker for a turn and the pauses for turns: wrong from the flicker on
    continuity = speckle_sign.orient_planes(canonical, magnitude, GRAM, speckle.SIGN_CONTINUITY, 0.1)
    wrong = (canonical * continuity[:, None] @ GRAM * true).sum(-1) < 0
    assert not wrong[0] and wrong[2:4].all() and wrong[SECOND_FAN:].any()
    # every stop a turn and no pause: continuity itself
    assert torch.equal(speckle_sign.orient_planes(canonical, magnitude, GRAM, speckle.SIGN_MOVES, 0.1, turn_pairs=1,
                                             pause_pairs=1000), continuity)
    with pytest.raises(ValueError, match="1 <= turn_pairs < pause_pairs"):
        speckle_sign.orient_planes(canonical, magnitude, GRAM, speckle.SIGN_MOVES, 0.1, turn_pairs=2, pause_pairs=0)


def test_oracles_take_the_true_direction_of_move_starts_runs_or_pairs():
    canonical, true = habit_scan()
    magnitude = rms(canonical)
    moving = magnitude >= 0.1
    runs = speckle_sign._moving_runs(canonical, magnitude, GRAM, 0.1, turn_pairs=2)
    rule = speckle_sign.orient_planes(canonical, magnitude, GRAM, speckle.SIGN_MOVES, 0.1, turn_pairs=2, pause_pairs=8,
                                 move_signs=(1, -1))
    assert torch.allclose((canonical * rule[:, None])[moving], true[moving])  # the habit's own rule: all right

    def oracle(signs, kind):
        return speckle_sign.oracle_signs(signs, canonical, magnitude, GRAM, runs, true, kind, pause_pairs=8)

    def right(signs):  # per pair, over the moving pairs: the direction agrees with the truth
        return ((canonical * signs[:, None] @ GRAM * true).sum(-1) > 0)[moving]

    # Every move started the wrong way (the other habit): the move-start oracle mends all of it, turns included.
    wrong_starts = speckle_sign.orient_planes(canonical, magnitude, GRAM, speckle.SIGN_MOVES, 0.1, turn_pairs=2,
                                         pause_pairs=8, move_signs=(-1, 1))
    assert not right(wrong_starts).any()
    assert torch.equal(oracle(wrong_starts, "move_starts"), rule)
    # A turn missed (the second half-swing of the first fan kept the direction before it): the move-start
    # oracle leaves the turns to the rule, the run oracle mends it.
    missed = rule.clone()
    second = runs[1][0]
    missed[second] = -missed[second]
    assert torch.equal(oracle(missed, "move_starts"), missed)
    assert torch.equal(oracle(missed, "runs"), rule)
    # The pair oracle gives every measured field its true direction, stops included; a field of 0 (the
    # twist's flicker) has none and keeps the rule's.
    pairs = oracle(torch.zeros(len(rule), dtype=torch.float64), "pairs")
    field = magnitude > 0
    assert (pairs[field] != 0).all() and ((canonical * pairs[:, None] @ GRAM * true).sum(-1)[field] > 0).all()
    assert (pairs[~field] == 0).all() and (~field).sum() == 1
    with pytest.raises(ValueError, match="not one of"):
        oracle(rule, "frames")
    with pytest.raises(ValueError, match="true fields"):
        speckle_sign.oracle_signs(rule, canonical, magnitude, GRAM, runs, true[:3], "runs", 8)


@pytest.mark.parametrize(("fan_sign", "twist_sign", "expected"), [(1.0, 1.0, (1, -1)), (-1.0, -1.0, (-1, 1))])
def test_calibrate_moves_finds_the_turns_the_pauses_and_the_habit(fan_sign, twist_sign, expected):
    canonical, true = habit_scan(fan_sign, twist_sign)
    estimate = speckle.MotionEstimate(torch.zeros(len(true)), torch.zeros(len(true), 2), canonical, rms(canonical),
                                      GRAM)
    rock, turn, min_run, pause, move_signs = speckle_sign.calibrate_moves([(estimate, true)] * 3, 0.1)
    # Flickers of 1 pair, turns of 4-5, pauses of 12: turns from 2 to 4 pairs, pauses from 6 to 12 tell them
    # apart; every run of moving pairs is real (2 pairs or more), so none may be passed over.
    assert 2 <= turn <= 4 and min_run == 1 and 6 <= pause <= 12 and move_signs == expected
    assert rock == 0.0  # nothing turns in plane here: the first candidate, no gate


def test_calibration_cost_of_the_moves_rule_is_the_oriented_fields_error():
    """``calibrate_moves`` scores candidates from per-run sums; they must equal the error of the fields
    ``orient_planes`` gives, pair by pair, on noisy fields with stops, flickers and rocks."""
    generator = torch.Generator().manual_seed(3)
    count = 400
    plane = torch.randn(count, 3, generator=generator, dtype=torch.float64) * torch.tensor([0.3, 0.005, 0.02])
    true = plane * torch.sign(torch.randn(count, 1, generator=generator, dtype=torch.float64)) \
        + 0.05 * torch.randn(count, 3, generator=generator, dtype=torch.float64)
    angle = 0.01 * torch.randn(count, generator=generator, dtype=torch.float64)
    estimate = speckle.MotionEstimate(angle, torch.zeros(count, 2, dtype=torch.float64), plane, rms(plane), GRAM)
    kinds = speckle_sign.move_directions(plane, GRAM)
    for rock, turn, min_run, pause, move_signs in [(0.0, 1, 1, 4, (1, 1)), (0.35, 2, 3, 6, (-1, 1)),
                                                   (0.5, 4, 8, 12, (1, -1))]:
        summary = speckle_sign._run_summaries(estimate, true, kinds, 0.3, rock, turn, min_run)
        signs = speckle_sign.orient_planes(plane, speckle_sign.rock_gated(rms(plane), angle, rock), GRAM, speckle.SIGN_MOVES,
                                      0.3, turn_pairs=turn, pause_pairs=pause, move_signs=move_signs,
                                      min_run_pairs=min_run)
        error = plane * signs[:, None] - true
        assert speckle_sign._moves_cost(summary, pause, move_signs) == pytest.approx(float((error @ GRAM * error).sum()),
                                                                                rel=1e-9)


def test_a_rock_counts_as_stopped_under_the_moves_rule():
    """A rock turns the plane in itself by ~1 degree per pair; its patches decorrelate and read as
    out-of-plane motion (here fields of 0.01 y, any direction). Gated, the rock is a pause between two
    fans, each started the habitual way; ungated, it is taken for a half-swing of the fan."""
    velocity = [0.02, 0.03, 0.03] + STOP * 2 + [0.01] * 10 + STOP * 2 + [0.03, 0.03]
    canonical, true = fan_planes(velocity)
    true[5:15] = 0.0  # the rock has no out-of-plane motion
    angle = torch.zeros(len(velocity), dtype=torch.float64)
    angle[5:15] = math.radians(1.0)
    gated = speckle_sign.rock_gated(rms(canonical), angle, 0.35)
    assert (gated[5:15] == 0).all() and torch.equal(gated[:5], rms(canonical)[:5])
    assert torch.equal(speckle_sign.rock_gated(rms(canonical), angle, 0.0), rms(canonical))
    # The hand's tremor turns the plane in itself by as much, but back and forth from pair to pair:
    # a fan with it is no rock.
    tremor = torch.full((len(velocity),), math.radians(0.6)) * torch.tensor([(-1.0) ** i for i in range(len(velocity))])
    assert torch.equal(speckle_sign.rock_gated(rms(canonical), tremor.double(), 0.35), rms(canonical))
    signs = speckle_sign.orient_planes(canonical, gated, GRAM, speckle.SIGN_MOVES, 0.1, turn_pairs=1, pause_pairs=8)
    assert signs.tolist() == [1, 1, 1] + [0] * 14 + [1, 1]
    ungated = speckle_sign.orient_planes(canonical, rms(canonical), GRAM, speckle.SIGN_MOVES, 0.1, turn_pairs=1,
                                    pause_pairs=8)
    assert ungated[5:15].tolist() == [-1] * 10  # the rock given out-of-plane motion, as the way back
    estimate = speckle.MotionEstimate(angle, torch.zeros(len(true), 2), canonical, rms(canonical), GRAM)
    rock, *_ = speckle_sign.calibrate_moves([(estimate, true)] * 2, 0.1)
    assert 0 < rock < 1.0


def test_moves_rule_passes_over_a_run_too_short_to_be_a_swing():
    # a fan's half-swing, a lone pair above the stop level within its turn, the next half-swing
    velocity = [0.02, 0.03, 0.03] + STOP * 5 + [0.01] + STOP * 5 + [-0.03, -0.02]
    canonical, true = fan_planes(velocity)
    magnitude = rms(canonical)
    kept = speckle_sign.orient_planes(canonical, magnitude, GRAM, speckle.SIGN_MOVES, 0.1, turn_pairs=2, pause_pairs=20,
                                 min_run_pairs=2)
    assert kept.tolist() == [1, 1, 1] + [0] * 11 + [-1, -1]
    taken = speckle_sign.orient_planes(canonical, magnitude, GRAM, speckle.SIGN_MOVES, 0.1, turn_pairs=2, pause_pairs=20)
    assert taken.tolist() == [1, 1, 1] + [0] * 5 + [-1] + [0] * 5 + [1, 1]  # the lone pair taken for a turn


def test_a_turn_is_judged_by_whole_runs_not_by_their_noisy_end_pairs():
    """Where a fan turns, the pairs on either side move least and their fields are the noisiest: here the
    last pair of one half-swing and the first of the next carry a lateral slope (0.85 of the tilt's)
    of opposite signs, so that each agrees with the tilts of its own run but the two disagree with each
    other. Compared by themselves they make the turn look like going on; the runs' sums do not."""
    v, a = 0.03, 0.85 * 0.03
    tilt = torch.tensor([0.0, 0.0, v], dtype=torch.float64)
    last = 0.5 * torch.tensor([0.0, a, v], dtype=torch.float64)  # true: the first half-swing's direction
    first = 0.5 * torch.tensor([0.0, a, -v], dtype=torch.float64)  # true: the second's (canonical: positive at x 40, y 30)
    stop = torch.tensor([0.0, 0.0, 0.001], dtype=torch.float64)
    canonical = torch.stack([tilt] * 3 + [last] + [stop] * 5 + [first] + [tilt] * 3)
    true = torch.stack([tilt] * 3 + [last] + [stop] * 5 + [first] + [-tilt] * 3)
    assert float(last @ GRAM @ tilt) > 0 and float(first @ GRAM @ tilt) < 0 and float(last @ GRAM @ first) > 0
    signs = speckle_sign.orient_planes(canonical, rms(canonical), GRAM, speckle.SIGN_MOVES, 0.1, turn_pairs=1,
                                  pause_pairs=8)
    moving = rms(canonical) >= 0.1
    oriented = canonical * signs[:, None]
    assert torch.allclose(oriented[moving], true[moving]) and (signs[~moving] == 0).all()


def minimum_jerk_increments(total: float, pairs: int) -> np.ndarray:
    """Per-pair increments of a minimum-jerk move by ``total`` over ``pairs`` pairs (the simulator's
    profile, written out again)."""
    s = np.linspace(0, 1, pairs + 1)
    return np.diff(total * (10 * s ** 3 - 15 * s ** 4 + 6 * s ** 5))


def local_from(a_y=None, a_x=None, length=None):
    params = torch.zeros(length if length is not None else len(a_y if a_y is not None else a_x), 6,
                         dtype=torch.float64)
    if a_y is not None:
        params[:, 1] = torch.as_tensor(a_y)
    if a_x is not None:
        params[:, 2] = torch.as_tensor(a_x)
    return tf.params_to_matrix(params)


def test_quarter_turn_is_the_median_net_twist_of_the_training_moves():
    still = np.zeros(40)
    fan = np.concatenate([minimum_jerk_increments(np.radians(20), 30), minimum_jerk_increments(np.radians(-40), 60),
                          minimum_jerk_increments(np.radians(20), 30)])
    turn = lambda degrees: minimum_jerk_increments(np.radians(degrees), 45)  # noqa: E731
    scans = [np.concatenate([still, np.zeros_like(fan), still, turn(80), still]),
             np.concatenate([still, turn(-100), still]),
             np.concatenate([still, turn(93), still, turn(-30), still])]  # a 30-degree twist is no quarter turn
    fans = np.concatenate([still, fan, still])
    local = [local_from(a_y=scan) for scan in scans] + [local_from(a_x=fans)]
    # median of 80, 100 and 93; a move's segment leaves out the slowest pairs at its ends (under 0.2
    # degrees per pair once smoothed), a few tenths of a degree of a quarter turn
    assert speckle_sign.calibrate_quarter_turn(local) == pytest.approx(93.0, abs=0.5)
    assert speckle_sign.calibrate_quarter_turn(local[:2]) == pytest.approx(90.0, abs=0.5)
    assert speckle_sign.calibrate_quarter_turn([local_from(a_x=fans)]) == 0.0  # fans only: none
    assert speckle_sign.calibrate_quarter_turn([torch.zeros(0, 4, 4, dtype=torch.float64)]) == 0.0  # a one-frame scan
    cut = np.concatenate([still, turn(92)[:30]])  # the scan ends within the turn: 78 degrees of 92, not counted
    assert speckle_sign.calibrate_quarter_turn(local[:2] + [local_from(a_y=cut)]) == pytest.approx(90.0, abs=0.5)


def quarter_turn_case(planes):
    """Canonical fields [M, 3] as the ``moves`` rule sees them, with a calibrated quarter turn of 90 degrees:
    ``(magnitude, calibration, estimate, signs, runs)``."""
    magnitude = rms(planes)
    calibration = speckle.SpeckleCalibration((0.0, 1000.0), (1.0,), (1.0,), PIXEL_MM, stop_threshold_mm=0.1,
                                             pause_pairs=8, quarter_turn_deg=90.0)
    estimate = speckle.MotionEstimate(torch.zeros(len(planes), dtype=torch.float64),
                                      torch.zeros(len(planes), 2, dtype=torch.float64), planes, magnitude, GRAM)
    signs = speckle_sign.orient_planes(planes, magnitude, GRAM, speckle.SIGN_MOVES, 0.1, pause_pairs=8)
    return magnitude, calibration, estimate, signs, speckle_sign._moving_runs(planes, magnitude, GRAM, 0.1)


def test_a_quarter_turn_measured_short_is_resized_to_the_calibrated_one():
    rates = [0.03] * 20 + STOP * 12 + [0.03] * 8  # a twist of 20 pairs (34 degrees), a pause, one of 8 (14)
    canonical, true = twist_planes(rates)
    magnitude, calibration, estimate, signs, runs = quarter_turn_case(canonical)
    a_y = lambda e: np.degrees(speckle_sign.motion_parameters(e, signs)[:, 1].numpy())  # noqa: E731
    before = a_y(estimate)
    assert abs(before[:20].sum()) == pytest.approx(np.degrees(np.arcsin(0.03)) * 20)  # 34.4 > 0.35 x 90
    sized = speckle_sign.sized_quarter_turns(estimate, signs, magnitude, runs, calibration)
    after = a_y(sized)
    assert abs(after[:20].sum()) == pytest.approx(90.0, abs=0.2)  # resized (to first order: a_Y = -asin p1)
    np.testing.assert_allclose(after[20:], before[20:])  # 14 degrees: no quarter turn, as measured
    torch.testing.assert_close(sized.magnitude[:20], magnitude[:20] * 90.0 / abs(before[:20].sum()))
    unsized = dataclasses.replace(calibration, quarter_turn_deg=0.0)
    assert speckle_sign.sized_quarter_turns(estimate, signs, magnitude, runs, unsized) is estimate


def test_a_quarter_turn_is_turned_about_the_probe_axis_before_it_is_sized():
    """A quarter turn whose measured fields also tilt the image along depth (p2) and are off the axis (p0):
    its fields become turns about the probe's axis (the grid's lateral middle, x = 40: ``twist_planes``),
    sized to the calibrated 90 degrees; the tilt is gone from the motion."""
    rates = [0.0] * 4 + [0.04] * 30 + [0.0] * 4
    canonical, true = twist_planes(rates)
    spurious = canonical.clone()
    spurious[4:34, 2] += 0.01  # a depth slope, a_X of 0.57 degrees a pair: 17 over the turn
    spurious[4:34, 0] += 0.3  # and 0.3 mm of t_z
    magnitude, calibration, estimate, signs, runs = quarter_turn_case(spurious)
    sized = speckle_sign.sized_quarter_turns(estimate, signs, magnitude, runs, calibration)
    oriented = sized.plane * signs[:, None]
    # d = p1 (x - 40): no depth slope, zero on the axis; the turn's net a_Y is the calibrated 90 degrees
    torch.testing.assert_close(oriented[4:34, 2], torch.zeros(30, dtype=torch.float64))
    torch.testing.assert_close(oriented[4:34, 0], -40.0 * oriented[4:34, 1])
    assert abs(np.degrees(speckle_sign.motion_parameters(sized, signs)[:, 1].sum().item())) == pytest.approx(90.0, abs=0.2)
    # the same direction as the true turn, each pair the same size (the rates were equal)
    assert bool(((oriented[4:34] @ GRAM * true[4:34]).sum(-1) > 0).all()) or \
        bool(((oriented[4:34] @ GRAM * true[4:34]).sum(-1) < 0).all())
    torch.testing.assert_close(oriented[4:34, 1], oriented[4:5, 1].expand(30))
    torch.testing.assert_close(sized.magnitude, rms(sized.plane))
    torch.testing.assert_close(sized.plane[:4], spurious[:4])  # nothing moved outside the turn


def test_a_run_is_of_the_kind_carrying_most_of_its_motion_not_of_its_strongest_pair():
    """A twist of 10 pairs, two of them fitted as a larger tilt (as happens where few patches correlate):
    the run is a twist, starts the twists' habitual way, and its direction comes from its twist pairs."""
    twist, true = twist_planes([-0.01] * 10)
    misfit, _ = fan_planes([0.02, 0.02])  # RMS 0.68 mm each, against the twist's 0.24
    canonical = twist.clone()
    canonical[[3, 6]] = misfit
    magnitude = rms(canonical)
    assert int(torch.argmax(magnitude)) in (3, 6) and magnitude[[3, 6]].sum() < magnitude.sum() / 2
    kinds, _ = speckle_sign.move_directions(canonical, GRAM)
    assert speckle.MOVE_KINDS[speckle_sign._run_kind(kinds, magnitude, list(range(10)))] == "twist"
    signs = speckle_sign.orient_planes(canonical, magnitude, GRAM, speckle.SIGN_MOVES, 0.1, pause_pairs=8,
                                  move_signs=(1, -1))
    twists = [i for i in range(10) if i not in (3, 6)]
    agree = ((canonical * signs[:, None]) @ GRAM * true).sum(-1)[twists]
    assert (agree > 0).all()  # the habit's twist direction, -rate: right; a tilt's (+1) would mirror it


def test_a_twist_seen_through_patches_on_one_side_of_the_probe_axis_is_still_a_twist():
    """Where the image holds signal on one side of the probe's axis only (a shadow, a narrow sector), a
    twist moves every patch the same way and over the patches looks like a tilt; judged over the whole
    image (``MotionEstimate.kind_gram``) it is a twist: it takes the twists' habitual direction and is
    sized as a quarter turn."""
    image = speckle.image_gram(SCALE, 480, 640)
    axis = float(image[0, 1] / image[0, 0])  # the image's lateral middle, mm
    patches = torch.tensor([[1.0, x, y] for x in (95.0, 110.0, 125.0) for y in (10.0, 30.0, 50.0)], dtype=torch.float64)
    patch_gram = patches.T @ patches
    rates = [0.0] * 6 + [-0.03] * 30 + [0.0] * 6  # 30 pairs of 1.7 degrees: 52 degrees about the axis
    true = torch.tensor([[-r * axis, r, 0.0] for r in rates], dtype=torch.float64)
    canonical = torch.where((true @ patches.mean(0))[:, None] < 0, -true, true)  # positive at the grid's centroid
    magnitude = (canonical @ patch_gram * canonical).sum(-1).div(len(patches)).sqrt()
    kinds_patches, _ = speckle_sign.move_directions(canonical[6:7], patch_gram)
    kinds_image, _ = speckle_sign.move_directions(canonical[6:7], image)
    assert speckle.MOVE_KINDS[int(kinds_patches)] == "tilt" and speckle.MOVE_KINDS[int(kinds_image)] == "twist"
    calibration = speckle.SpeckleCalibration((0.0, 1000.0), (1.0,), (1.0,), PIXEL_MM, stop_threshold_mm=0.1,
                                             pause_pairs=8, move_signs=(1, -1), quarter_turn_deg=90.0)
    zeros = torch.zeros(len(rates), dtype=torch.float64)
    estimate = speckle.MotionEstimate(zeros, torch.zeros(len(rates), 2, dtype=torch.float64), canonical, magnitude,
                                      patch_gram, image)
    runs = speckle_sign._moving_runs(canonical, magnitude, patch_gram, 0.1)
    for kind_gram, right in ((image, True), (None, False)):
        signs = speckle_sign.orient_planes(canonical, magnitude, patch_gram, speckle.SIGN_MOVES, 0.1, pause_pairs=8,
                                      move_signs=(1, -1), kind_gram=kind_gram)
        agree = ((canonical * signs[:, None]) @ patch_gram * true).sum(-1)[6:36] > 0
        assert bool(agree.all()) == right and bool((~agree).all()) == (not right)
        sized = speckle_sign.sized_quarter_turns(dataclasses.replace(estimate, kind_gram=kind_gram), signs, magnitude,
                                            runs, calibration)
        a_y = np.degrees(speckle_sign.motion_parameters(sized, signs)[:, 1].sum().item())
        assert abs(a_y) == pytest.approx(90.0 if right else np.degrees(np.arcsin(0.03)) * 30, abs=0.2)
    # estimate_motion judges kinds over the frames' whole image.
    measured = speckle.PairMeasurements(torch.arange(1, 3), patches[:, 1:], torch.zeros(2, 9, 2),
                                        torch.full((2, 9), 0.9, dtype=torch.float64),
                                        torch.ones(2, 9, dtype=torch.bool), PIXEL_MM, (480, 640))
    torch.testing.assert_close(speckle.estimate_motion(measured, calibration).kind_gram, image)


def test_sign_accuracy_counts_pairs_over_the_image():
    # Three pairs: a fan (a_X), a pure t_z and one without out-of-plane motion.
    params = torch.tensor([[0.0, 0.0, 0.02, 0.1, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.5],
                           [0.01, 0.0, 0.0, 0.3, 0.2, 0.0]], dtype=torch.float64)
    true = tf.params_to_matrix(params)
    mirrored = params.clone()
    mirrored[:, [1, 2, 5]] *= -1
    right = speckle_sign.out_of_plane_sign_accuracy(true, true, SCALE, 480, 640)
    wrong = speckle_sign.out_of_plane_sign_accuracy(tf.params_to_matrix(mirrored), true, SCALE, 480, 640)
    none = speckle_sign.out_of_plane_sign_accuracy(torch.eye(4, dtype=torch.float64).expand(3, 4, 4), true, SCALE, 480, 640)
    assert right == (2, 2, 2) and wrong == (0, 2, 2) and none == (0, 0, 2)


def test_motion_parameters_reproduce_the_elevational_field():
    # Any rigid transform's z row: the parameters rebuilt from its field move every point out of plane
    # exactly as the transform does.
    params = torch.tensor([0.01, 0.02, -0.03, 0.4, -0.2, 0.7], dtype=torch.float64)
    tform = tf.params_to_matrix(params)
    estimate = speckle.MotionEstimate(params[:1], params[None, 3:5], speckle.plane_of_transforms(tform)[None],
                                      torch.ones(1), GRAM)
    rebuilt = tf.params_to_matrix(speckle_sign.motion_parameters(estimate, torch.ones(1)))
    torch.testing.assert_close(rebuilt[0], tform)


# --------------------------------------------------------------------------------------------
# Simulated scans and generate_DDF.py --method speckle
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny5_root(tmp_path_factory) -> Path:
    """5 subjects (the baseline's 5-fold split needs them) x 2 rotation scans x 16 frames of 120x160."""
    root = tmp_path_factory.mktemp("tiny5")
    generate_dataset(root, "tiny", seed=0, subjects=5, frames=16)
    return root


def test_simulated_scan_in_plane_motion_beats_no_motion(tiny5_root):
    refs = find_scans(tiny5_root)
    calibration = load_calibration(tiny5_root / CALIB_FILE)
    scale = np.array(calibration.scale)
    curve = speckle_scan.calibrate(((s.frames, s.tforms) for s in map(read_scan, refs[:4])), scale,
                              calibration.calib_R_T)
    for ref in refs[4:6]:
        scan = read_scan(ref)
        height, width = scan.frame_size
        _, local_true = true_transforms(scan.tforms, calibration)
        global_, local, _ = speckle_scan.predict_scan_speckle(scan.frames, scale, curve, speckle.SIGN_ZERO)
        torch.testing.assert_close(global_, tf.chain_local_transforms(local))
        # The in-plane part of the truth: its out-of-plane parameters set to zero.
        params = tf.matrix_to_params(local_true)
        params[:, [1, 2, 5]] = 0
        in_plane_true = tf.params_to_matrix(params)
        identity = torch.eye(4, dtype=torch.float64).expand_as(local)
        error = metrics.field_errors_from_transforms(in_plane_true, local, scale, height, width).mean()
        still = metrics.field_errors_from_transforms(in_plane_true, identity, scale, height, width).mean()
        # Measured 0.62 and 0.53 of the no-motion error at this coarse size (0.9 mm pixels, ~0.2 px per frame).
        assert error < 0.8 * still, (ref.key, float(error), float(still))


def test_generate_ddf_speckle_end_to_end(tiny5_root, tmp_path):
    out, summary = generate_DDF.main(["--method", "speckle", "--data_path", str(tiny5_root), "--out",
                                      str(tmp_path / "out"), "--speckle_sign", "continuity", "--plots"])
    table = pd.read_csv(out / "scores.csv")
    # subject_folds(range(5), 5, 4) puts subject 1 alone in the test fold 4.
    assert table["key"].tolist() == ["sub001__LH_rotation", "sub001__RH_rotation"]
    assert {"GPE", "GLE", "LPE", "LLE", "final", "oop_sign_agree", "oop_sign_counted"} <= set(table.columns)
    assert (table["oop_sign_agree"] <= table["oop_sign_counted"]).all()
    assert (table["oop_sign_counted"] <= table["oop_moving_pairs"]).all() and (table["oop_moving_pairs"] > 0).all()
    assert summary.loc["all", "num_scans"] == 2 and (out / "summary.csv").is_file() and (out / "metrics.h5").is_file()
    assert (out / "plots" / "001_LH_rotation_drift.png").is_file()
    # the accuracy's interval over whole moves holds the accuracy, and the moves counted are the scans' own
    found = re.search(r"prediction: (\d\.\d+) \(.*interval (\d\.\d+)-(\d\.\d+) from resampling the (\d+) moves",
                      (out / "tables.txt").read_text())
    assert table["oop_sign_counted"].sum() > 0 and found is not None
    accuracy, low, high, num_moves = float(found[1]), float(found[2]), float(found[3]), int(found[4])
    assert low <= accuracy <= high and num_moves == table["oop_moves"].sum() > 0
    calibration = speckle.SpeckleCalibration.load(out / speckle.CALIBRATION_FILE)
    assert calibration.num_pairs == 6 * 15 and "training folds" in calibration.source
    # The written calibration is read back instead of calibrating again; the zero rule gives the
    # in-plane part only, so its sign counts are 0 (no direction given).
    again, _ = generate_DDF.main(["--method", "speckle", "--data_path", str(tiny5_root), "--out",
                                  str(tmp_path / "again"), "--speckle_calibration", str(out / speckle.CALIBRATION_FILE),
                                  "--split", "val"])
    assert speckle.SpeckleCalibration.load(again / speckle.CALIBRATION_FILE) == calibration
    zero = pd.read_csv(again / "scores.csv")
    assert len(zero) == 2 and (zero["oop_sign_counted"] == 0).all() and np.isfinite(zero["GPE"]).all()
    assert calibration.pause_pairs in speckle_sign.PAUSE_CANDIDATES  # calibrated with the rest
    moves, _ = generate_DDF.main(["--method", "speckle", "--data_path", str(tiny5_root), "--out",
                                  str(tmp_path / "moves"), "--speckle_calibration", str(out / speckle.CALIBRATION_FILE),
                                  "--split", "val", "--speckle_sign", "moves"])
    given = pd.read_csv(moves / "scores.csv")
    assert len(given) == 2 and np.isfinite(given["GPE"]).all()
    assert (given["oop_sign_agree"] <= given["oop_sign_counted"]).all()
    assert "'moves' rule's prediction" in (moves / "tables.txt").read_text()
    # The pair oracle: every pair given a direction gets the true one; the output says it is an oracle.
    oracle, _ = generate_DDF.main(["--method", "speckle", "--data_path", str(tiny5_root), "--out",
                                   str(tmp_path / "oracle"), "--speckle_calibration",
                                   str(out / speckle.CALIBRATION_FILE), "--split", "val", "--speckle_sign", "moves",
                                   "--speckle_oracle", "pairs"])
    told = pd.read_csv(oracle / "scores.csv")
    assert told["oop_sign_counted"].sum() > 0 and (told["oop_sign_agree"] == told["oop_sign_counted"]).all()
    assert (oracle / "tables.txt").read_text().startswith("ORACLE pairs:")
    assert generate_DDF.default_speckle_out_dir(tiny5_root, "val", "moves", "pairs").name == \
        f"speckle-{tiny5_root.name}-val-moves-oracle_pairs"
    # A held-out dataset of other subjects (too few to split into folds) is scored whole with a
    # calibration made on another dataset's training folds.
    held_out = tmp_path / "held_out"
    generate_dataset(held_out, "tiny", seed=9, subjects=2)
    whole, _ = generate_DDF.main(["--method", "speckle", "--data_path", str(held_out), "--out",
                                  str(tmp_path / "whole"), "--speckle_calibration", str(out / speckle.CALIBRATION_FILE),
                                  "--split", "all"])
    assert len(pd.read_csv(whole / "scores.csv")) == 4


def test_generate_ddf_bad_input_gives_one_clear_error(tiny5_root, tmp_path):
    with pytest.raises(ValueError, match="--method speckle needs --data_path"):
        generate_DDF.main(["--method", "speckle"])
    with pytest.raises(ValueError, match="needs --ckpt"):
        generate_DDF.main([])
    with pytest.raises(ValueError, match="only apply to --method speckle"):
        generate_DDF.main(["--ckpt", str(tmp_path / "best.pt"), "--speckle_sign", "continuity"])
    with pytest.raises(ValueError, match="add --speckle_sign moves"):
        generate_DDF.main(["--method", "speckle", "--data_path", str(tiny5_root), "--speckle_oracle", "runs"])
    malformed = tmp_path / "cal.json"
    malformed.write_text(json.dumps({"format_version": 1, "band_edges_mm": [0, 10], "sigma_mm": [1.0]}))
    with pytest.raises(ValueError, match="missing field") as error:
        generate_DDF.main(["--method", "speckle", "--data_path", str(tiny5_root), "--speckle_calibration",
                           str(malformed), "--out", str(tmp_path / "out")])
    assert str(malformed) in str(error.value)
    assert not (tmp_path / "out").exists()  # nothing written


# --------------------------------------------------------------------------------------------
# The moves rule's test of a turn, on speckle that decorrelates out of plane
# --------------------------------------------------------------------------------------------


ELEVATION_SIGMA_MM, ELEVATION_STEP_MM = 0.15, 0.025  # the beam's elevational profile, and its sampling


@pytest.fixture(scope="module")
def elevational_speckle():
    """``frame_at(z)``: uint8 160 x 240 frames of one tissue seen by a plane moved z mm out of plane.

    Independent complex speckle layers every ELEVATION_STEP_MM, summed under a Gaussian elevational
    profile of standard deviation ELEVATION_SIGMA_MM: two planes dz apart share layers in proportion
    to exp(-dz^2 / (4 sigma^2)), so their envelopes correlate as about exp(-dz^2 / (2 sigma^2)).
    """
    height, width = 160, 240
    depths = np.arange(-0.8, 3.2, ELEVATION_STEP_MM)
    layers = np.stack([speckle_field(height, width, seed=100 + j) for j in range(len(depths))]).astype(np.complex64)

    def frame_at(z: float) -> np.ndarray:
        weights = np.exp(-(depths - z) ** 2 / (2 * ELEVATION_SIGMA_MM ** 2)).astype(np.float32)
        envelope = np.abs(np.tensordot(weights, layers, axes=1))
        decibels = 20 * np.log10(envelope / np.median(envelope) + 1e-6)
        return np.clip(128 + 255 * decibels / 60, 0, 255).astype(np.uint8)

    # The curve, from pairs at known distances (a uniform field: every patch moves by dz).
    steps = np.array([0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4])
    frames = np.stack([frame_at(z) for step in steps for z in (0.0, step)])
    measured = speckle.measure_pairs(frames, SCALE, moving=range(1, len(frames), 2))
    distance = torch.as_tensor(steps, dtype=torch.float64)[:, None].expand_as(measured.peak)
    sigma, rho0 = speckle.fit_decorrelation_curve(measured.peak[measured.usable], distance[measured.usable])
    curve = speckle.SpeckleCalibration((0.0, 1000.0), (sigma,), (rho0,), PIXEL_MM, stop_threshold_mm=0.03,
                                       turn_pairs=1, pause_pairs=12, min_run_pairs=3)
    return frame_at, curve


def moves_of(frame_at, positions, curve):
    """The ``moves`` rule's signs and turn verdicts for frames at elevational ``positions`` (mm)."""
    frames = np.stack([frame_at(z) for z in positions])
    estimate = speckle.estimate_motion(speckle.measure_pairs(frames, SCALE, curve.settings), curve)
    runs = speckle_sign._moving_runs(estimate.plane, estimate.magnitude, estimate.gram, curve.stop_threshold_mm,
                                curve.turn_pairs, curve.min_run_pairs)
    verdicts = speckle_sign.turn_verdicts(frames, SCALE, estimate, estimate.magnitude, runs, curve)
    return speckle_sign.orient_moves(frames, SCALE, estimate, curve)[0], runs, verdicts


def test_turn_test_tells_a_fan_that_turned_back_from_one_that_went_on(elevational_speckle):
    frame_at, curve = elevational_speckle
    assert 0.1 < curve.sigma_mm[0] < 0.25  # the layers' profile, measured back (about ELEVATION_SIGMA_MM)
    forward = list(np.arange(0.0, 1.2, 0.1))  # 0.1 mm per pair: well above the stop level
    stop = [1.2] * 5  # four pairs without motion: shorter than a pause, so a turn unless tested
    back = list(1.2 - np.arange(0.1, 1.25, 0.1))
    on = list(1.2 + np.arange(0.1, 1.25, 0.1))
    for after, goes_on in ((back, False), (on, True)):
        signs, runs, verdicts = moves_of(frame_at, forward + stop + after, curve)
        assert len(runs) == 2 and verdicts == ({1} if goes_on else set())
        first, second = signs[runs[0][0]], signs[runs[1][0]]
        assert (first == first[0]).all() and (second == second[0]).all()  # a uniform field chains exactly
        assert second[0] == (first[0] if goes_on else -first[0])
    # The rule without the frames takes every short stop for a turn.
    frames = np.stack([frame_at(z) for z in forward + stop + on])
    estimate = speckle.estimate_motion(speckle.measure_pairs(frames, SCALE, curve.settings), curve)
    blind = speckle_sign.orient_planes(estimate.plane, estimate.magnitude, estimate.gram, speckle.SIGN_MOVES,
                                  curve.stop_threshold_mm, turn_pairs=1, pause_pairs=12, min_run_pairs=3)
    assert blind[len(forward) + 6] == -blind[0]

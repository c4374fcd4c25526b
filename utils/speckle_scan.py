"""Speckle tracking on whole scans: ``predict_scan_speckle`` and its ``calibrate``.

``predict_scan_speckle`` gives every frame of a scan a transform from the images alone, in exactly the
form ``utils.evaluation.predict_transforms`` returns for a network, so ``generate_DDF.py --method speckle``
scores it with the same tables, files and plots; ``calibrate`` fits what it needs on the training fold.
The physics and the per-pair measurements: ``utils.speckle``; the out-of-plane sign: ``utils.speckle_sign``.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from utils import transform as tf
from utils.errors import InputError
from utils.speckle import (SIGN_CONTINUITY, SIGN_MOVES, SIGN_ZERO, SpeckleCalibration, SpeckleSettings, as_frames,
                           estimate_motion, fit_depth_bands, measure_pairs, pixel_size, plane_of_transforms)
from utils.speckle_sign import (best_stop_threshold, calibrate_moves, calibrate_quarter_turn, motion_parameters,
                                orient_moves, orient_planes, sign_agreement)


def predict_scan_speckle(frames, scale, calibration: SpeckleCalibration, sign_rule: str = SIGN_ZERO,
                         oracle: str | None = None, true_local=None):
    """Every frame's global and local transform of a scan, from speckle tracking.

    Args:
        frames: uint8 [N, H, W] numpy array or tensor, full resolution (N >= 2).
        scale: [4, 4] ``S`` of the frames (pixel -> image mm); must match the calibration's pixel size.
        calibration: ``SpeckleCalibration`` (its settings place and match the patches).
        sign_rule: one of ``SIGN_RULES`` (``zero`` skips the out-of-plane estimate entirely).
        oracle: None, or one of ``ORACLES`` with the ``moves`` rule: part of the direction is taken from
            ``true_local`` ([N-1, 4, 4] true ``T_{i-1<-i}``; ``oracle_signs``), a diagnostic.
    Returns:
        ``(global [N-1, 4, 4], local [N-1, 4, 4], seconds)``: float64 CPU tensors ``T_{0<-i}`` and
        ``T_{i-1<-i}`` for i = 1..N-1 (image mm), and the wall time from the frames in memory to
        both, as ``utils.evaluation.predict_transforms`` returns them.
    Raises:
        ValueError: bad frames, scale or rule, or a calibration made for another pixel size.
    """
    calibration.check_rule(sign_rule)
    calibration.check_pixel_size(scale)
    if oracle is not None and sign_rule != SIGN_MOVES:
        raise InputError(f"an oracle ({oracle!r}) corrects the {SIGN_MOVES!r} sign rule only, not {sign_rule!r}")
    start = time.perf_counter()
    frames = as_frames(frames)
    if len(frames) < 2:
        raise InputError(f"a scan needs at least 2 frames to predict motion; got {len(frames)}")
    measurements = measure_pairs(frames, scale, calibration.settings)
    estimate = estimate_motion(measurements, None if sign_rule == SIGN_ZERO else calibration)
    if sign_rule == SIGN_MOVES:
        true_plane = None if true_local is None else \
            plane_of_transforms(torch.as_tensor(true_local, dtype=torch.float64))
        signs, estimate = orient_moves(frames, scale, estimate, calibration, oracle, true_plane)
    else:
        signs = orient_planes(estimate.plane, estimate.magnitude, estimate.gram, sign_rule,
                              calibration.stop_threshold_mm, calibration.initial_sign)
    local = tf.params_to_matrix(motion_parameters(estimate, signs))
    global_ = tf.chain_local_transforms(local)
    return global_, local, time.perf_counter() - start


def calibrate(scans, scale, calib_r_t, settings: SpeckleSettings | None = None, band_mm: float = 10.0,
              min_samples: int = 100, min_rms_mm: float = 0.1, source: str = "", poses=None) -> SpeckleCalibration:
    """Calibrate the decorrelation curve, the stop threshold, the initial sign and the ``moves`` rule's
    settings on training scans.

    Args:
        scans: iterable of ``(frames uint8 [N, H, W], tforms [N, 4, 4])`` (tool -> camera poses);
            the TRAINING fold only: its true motion is used.
        scale, calib_r_t: ``S`` and ``C`` of the dataset ([4, 4] each).
        settings: patch settings (default ``SpeckleSettings()``), stored in the result.
        band_mm, min_samples: depth bands (``fit_depth_bands``).
        min_rms_mm: pairs with less true out-of-plane motion than this (RMS over the patch grid) do
            not vote for the initial sign.
        source: free text stored in the result.
        poses: iterable of the training scans' whole tracker poses [N, 4, 4], for the quarter turn
            (``calibrate_quarter_turn``; it comes after the first fan and rock, so ``scans`` may hold
            only their beginnings); None: the poses of ``scans``.
    Returns:
        ``SpeckleCalibration``. The curve: every usable patch of every consecutive pair gives a sample
        ``(peak NCC, true elevational displacement of its centre = z of T_{i-1<-i} c - c, depth)``.
        The stop threshold: among quantiles of the estimated magnitudes, the one minimising the summed
        squared error of the ``continuity`` rule's out-of-plane fields over the patch grid, each scan
        taken in its better overall direction (the direction itself is not observable). The initial
        sign: the overall direction most training scans need. The ``moves`` rule's rock gate, turn,
        run and pause lengths and move directions: ``calibrate_moves``; its quarter turn:
        ``calibrate_quarter_turn``.
    Raises:
        ValueError: no scans, or too few usable patches.
    """
    settings = settings or SpeckleSettings()
    sx, sy = pixel_size(scale)
    calib_r_t = torch.as_tensor(np.array(calib_r_t, dtype=np.float64))
    samples = {"peak": [], "displacement": [], "depth": []}
    kept, own_poses = [], []  # (measurements, true planes) per scan, for the sign calibration; the poses
    for frames, tforms in scans:
        own_poses.append(tforms)
        measurements = measure_pairs(frames, scale, settings)
        local = tf.local_transforms(torch.as_tensor(np.asarray(tforms), dtype=torch.float64), calib_r_t)
        true_plane = plane_of_transforms(local[measurements.frames - 1])  # [M, 3]
        centres = measurements.centres_mm
        displacement = true_plane[:, :1] + true_plane[:, 1:2] * centres[:, 0] + true_plane[:, 2:] * centres[:, 1]
        usable = measurements.usable
        samples["peak"].append(measurements.peak[usable])
        samples["displacement"].append(displacement[usable])
        samples["depth"].append(centres[:, 1].expand_as(usable)[usable])
        kept.append((measurements, true_plane))
    if not kept:
        raise InputError("no training scans to calibrate the speckle decorrelation curve on")
    edges, sigma, rho0, counts = fit_depth_bands(torch.cat(samples["peak"]), torch.cat(samples["displacement"]),
                                                 torch.cat(samples["depth"]), band_mm, min_samples)
    curve = SpeckleCalibration(tuple(edges), tuple(sigma), tuple(rho0), (sx, sy), settings, samples=tuple(counts),
                               num_pairs=sum(len(m.frames) for m, _ in kept), source=source)
    estimates = [(estimate_motion(m, curve), true_plane) for m, true_plane in kept]
    threshold = best_stop_threshold(estimates)
    votes = 0
    for estimate, true_plane in estimates:
        signs = orient_planes(estimate.plane, estimate.magnitude, estimate.gram, SIGN_CONTINUITY, threshold, 1)
        agree, counted = sign_agreement(estimate.plane * signs[:, None], true_plane, estimate.gram, min_rms_mm)
        votes += int(torch.sign(2 * agree.sum() - counted.sum()))
    rock_deg, turn_pairs, min_run_pairs, pause_pairs, move_signs = calibrate_moves(estimates, threshold)
    quarter_turn = calibrate_quarter_turn(
        tf.local_transforms(torch.as_tensor(np.asarray(tforms), dtype=torch.float64), calib_r_t)
        for tforms in (own_poses if poses is None else poses))
    return dataclasses.replace(curve, stop_threshold_mm=float(threshold), initial_sign=-1 if votes < 0 else 1,
                               rock_deg=rock_deg, turn_pairs=turn_pairs, min_run_pairs=min_run_pairs,
                               pause_pairs=pause_pairs, move_signs=move_signs, quarter_turn_deg=quarter_turn)

"""Moves of the probe in the true motion of a scan, and figures counted per move.

A *move* is a stretch of out-of-plane turning (a fan swinging side to side with its turns, a rock, a
quarter turn); between two moves lies a stretch of its own (a pause, the hand's drift). Moves are
the unit in which an out-of-plane direction is right or wrong (``oop_headroom.py``), and so the unit
over which its accuracy varies: pairs within one move are not independent trials, so the out-of-plane
sign accuracy gets its interval from resampling whole moves (``sign_accuracy_interval``).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import gaussian_filter1d

from utils import transform as tf

# Moves in the true motion of a 20 fps scan (``move_segments``). The simulated protocol's fans peak at
# 1-3 degrees per pair and its quarter turns at 4-5; at rest, drift and tremor turn the plane by a
# median 0.04-0.09 degrees per pair once smoothed (the 6 scans of data/sim2025_test).
MOVE_SMOOTHING_PAIRS = 2.0  # Gaussian sigma (pairs): tremor, aliased at 20 fps, averages out
MOVE_SPEED_DEG = 0.2  # smoothed out-of-plane turning per pair above which the probe is moving (4 deg/s)
MOVE_PEAK_DEG = 0.5  # a move peaks above this; a stretch that does not is the hand's drift
# Stillness shorter than this is a turn within a move (a minimum-jerk swing slows below
# MOVE_SPEED_DEG for about 6 pairs at each turn); the protocol's pauses last 6-20 frames and the
# moves slow down into them, so a short pause may join two moves: harmless, they then share a draw.
MOVE_MERGE_PAIRS = 12
# The sign accuracy's interval: a percentile bootstrap over moves, seeded so that a report repeats.
INTERVAL_CONFIDENCE = 0.95
INTERVAL_DRAWS = 4000
INTERVAL_SEED = 0


def move_segments(local: torch.Tensor) -> np.ndarray:
    """[N] int64: for each pair of the true local transforms [N, 4, 4], the number of its segment (0, 1,
    ... in order), a segment being a move or a stretch between two moves.

    Moves are stretches where the out-of-plane turning, smoothed over a few pairs, exceeds
    ``MOVE_SPEED_DEG`` per pair and peaks above ``MOVE_PEAK_DEG``, joined across stillness shorter than
    ``MOVE_MERGE_PAIRS`` (a turn, not a pause).
    """
    angles = tf.matrix_to_params(local)[:, [1, 2]].numpy()  # a_Y, a_X: the out-of-plane turning
    speed = np.degrees(np.hypot(*gaussian_filter1d(angles, MOVE_SMOOTHING_PAIRS, axis=0, mode="nearest").T))
    moving = np.flatnonzero(speed > MOVE_SPEED_DEG)
    moves = []  # [start, end) pairs
    for run in np.split(moving, np.flatnonzero(np.diff(moving) > 1) + 1) if len(moving) else []:
        start, end = int(run[0]), int(run[-1]) + 1
        if speed[start:end].max() <= MOVE_PEAK_DEG:
            continue
        if moves and start - moves[-1][1] < MOVE_MERGE_PAIRS:
            moves[-1][1] = end
        else:
            moves.append([start, end])
    boundaries = sorted({b for move in moves for b in move} - {0, len(local)})
    segments = np.zeros(len(local), dtype=np.int64)
    segments[boundaries] = 1
    return np.cumsum(segments)


def counts_per_segment(segments: np.ndarray, *flags) -> np.ndarray:
    """[S, len(flags)] int64: how many pairs of each segment (``move_segments``) each bool [N] flag holds."""
    size = int(segments.max()) + 1 if len(segments) else 0
    return np.stack([np.bincount(segments, weights=np.asarray(flag, dtype=np.float64), minlength=size)
                     for flag in flags], axis=-1).round().astype(np.int64)


def sign_accuracy_interval(agree: np.ndarray, counted: np.ndarray, confidence: float = INTERVAL_CONFIDENCE,
                           draws: int = INTERVAL_DRAWS, seed: int = INTERVAL_SEED) -> tuple[float, float]:
    """A percentile-bootstrap interval of ``sum(agree) / sum(counted)`` that resamples whole segments.

    Args:
        agree, counted: [S] pairs given the right direction / a direction in each segment (moves of
            every scan together); segments that count no pair are left out.
    Returns:
        ``(low, high)``, NaN when no pair is counted.
    """
    agree, counted = np.asarray(agree, dtype=np.float64), np.asarray(counted, dtype=np.float64)
    keep = counted > 0
    agree, counted = agree[keep], counted[keep]
    if not len(counted):
        return float("nan"), float("nan")
    picks = np.random.default_rng(seed).integers(0, len(counted), size=(draws, len(counted)))
    ratios = agree[picks].sum(1) / counted[picks].sum(1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(ratios, [tail, 1 - tail])
    return float(low), float(high)

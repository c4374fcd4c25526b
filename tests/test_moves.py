"""utils/moves.py: moves found in true motion, per-move counts and the sign accuracy's interval over moves."""

import math

import numpy as np
import pytest
import torch

from utils import moves
from utils import transform as tf


def swing_increments(amplitude_deg: float, half_cycle_pairs: int, half_swings: int) -> np.ndarray:
    """Per-pair a_X (rad) of a fan 0 -> +A -> -A ... -> 0 by minimum-jerk moves (the simulator's swing,
    written out again here): ``half_swings`` moves of 2A between the ends, half a move at each end."""
    def move(start, end, pairs):
        s = np.linspace(0, 1, pairs + 1)
        angle = start + (end - start) * (10 * s ** 3 - 15 * s ** 4 + 6 * s ** 5)
        return np.diff(angle)
    targets = [0.0, amplitude_deg] + [(-1) ** k * -amplitude_deg for k in range(half_swings)] + [0.0]
    parts = [move(a, b, half_cycle_pairs // (2 if k in (0, len(targets) - 2) else 1))
             for k, (a, b) in enumerate(zip(targets[:-1], targets[1:]))]
    return np.radians(np.concatenate(parts))


def local_from_a_x(a_x: np.ndarray):
    params = torch.zeros(len(a_x), 6, dtype=torch.float64)
    params[:, 2] = torch.from_numpy(a_x)
    return tf.params_to_matrix(params)


def test_move_segments_keep_a_fan_with_its_turns_whole_and_split_at_pauses():
    fan = swing_increments(20.0, 30, 3)  # peaks ~2.5 degrees per pair; speed ~0 at each of its 4 turns
    drift = np.radians(0.3 * np.sin(np.linspace(0, np.pi, 12)))  # a hand's slow wander: no move
    still = np.zeros(30)
    a_x = np.concatenate([still, fan, still, drift, still, fan, still])
    segments = moves.move_segments(local_from_a_x(a_x))
    first_fan = slice(30, 30 + len(fan))
    second_fan = slice(30 + len(fan) + 72, 30 + 2 * len(fan) + 72)
    assert segments.tolist() == sorted(segments.tolist()) and segments[0] == 0
    assert segments.max() == 4  # still, fan, still (with the drift), fan, still
    fast = np.abs(np.degrees(a_x)) > 0.5
    for fan_pairs in (first_fan, second_fan):
        assert len(np.unique(segments[fan_pairs][fast[fan_pairs]])) == 1  # the turns do not split it
    assert segments[first_fan][fast[first_fan]][0] == 1 and segments[second_fan][fast[second_fan]][0] == 3
    assert (segments[30 + len(fan) + 20: 30 + len(fan) + 60] == 2).all()  # the drift is no move


def test_moves_closer_than_a_pause_share_a_segment():
    fan = swing_increments(20.0, 30, 1)
    near = np.concatenate([np.zeros(30), fan, np.zeros(moves.MOVE_MERGE_PAIRS - 8), fan, np.zeros(30)])
    far = np.concatenate([np.zeros(30), fan, np.zeros(moves.MOVE_MERGE_PAIRS + 20), fan, np.zeros(30)])
    assert moves.move_segments(local_from_a_x(near)).max() == 2
    assert moves.move_segments(local_from_a_x(far)).max() == 4
    assert moves.move_segments(local_from_a_x(np.zeros(50))).tolist() == [0] * 50




def test_counts_per_segment_sum_each_flag_within_each_segment():
    segments = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    agree = np.array([1, 0, 1, 0, 0, 1, 1, 1, 0], dtype=bool)
    counted = np.array([1, 1, 1, 0, 1, 1, 1, 1, 1], dtype=bool)
    assert moves.counts_per_segment(segments, agree, counted).tolist() == [[2, 3], [0, 1], [3, 4]]


def binomial_half_width(p: float, trials: int) -> float:
    """1.96 standard errors of a proportion: the normal approximation a 95 % interval should approach."""
    return 1.96 * math.sqrt(p * (1 - p) / trials)


def test_interval_over_whole_moves_is_as_wide_as_the_number_of_moves_allows():
    # 400 moves of 20 pairs, each wholly right (300) or wholly wrong (100): the ratio is a proportion
    # over 400 trials, not 8000, and the interval must be that wide.
    agree = np.array([20] * 300 + [0] * 100)
    counted = np.full(400, 20)
    low, high = moves.sign_accuracy_interval(agree, counted)
    assert low < 0.75 < high
    assert (high - low) / 2 == pytest.approx(binomial_half_width(0.75, 400), rel=0.15)
    # the same 8000 pairs as independent trials (a segment each): far narrower
    pairs = np.repeat([1, 0], [6000, 2000])
    low_pairs, high_pairs = moves.sign_accuracy_interval(pairs, np.ones(8000))
    assert (high_pairs - low_pairs) / 2 == pytest.approx(binomial_half_width(0.75, 8000), rel=0.15)
    assert (high - low) > 3 * (high_pairs - low_pairs)


def test_interval_weighs_moves_by_their_pairs_leaves_uncounted_ones_out_and_repeats():
    agree, counted = np.array([10, 0, 0, 3]), np.array([10, 0, 0, 4])  # two moves given no direction
    low, high = moves.sign_accuracy_interval(agree, counted)
    assert 0.75 <= low <= high <= 1.0  # resampling the two counted moves: 3/4 .. 1 of pairs, never the zeros
    assert (low, high) == moves.sign_accuracy_interval(agree, counted)
    assert all(math.isnan(v) for v in moves.sign_accuracy_interval(np.zeros(3), np.zeros(3)))

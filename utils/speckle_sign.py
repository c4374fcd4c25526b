"""The out-of-plane sign of speckle tracking's motion fields: ``SIGN_RULES`` and their calibration.

``utils.speckle`` measures, for each pair of consecutive frames, the elevational displacement field
``d(x, y) = p0 + p1 x + p2 y`` up to its sign (``MotionEstimate.plane``); this module chooses the sign of
each pair from the sequence of fields, and scores a choice against the true motion.

Decorrelation is symmetric: it says how far, never which way. ``SIGN_RULES``: ``zero`` predicts no
out-of-plane motion at all (the default: a wrong sign doubles the error and then accumulates in the
global transforms); ``continuity`` assumes a smooth hand: the direction of the out-of-plane motion field
is kept from pair to pair (the sign that makes consecutive fields agree), and it is reversed after each
*stop*, a run of pairs whose estimated out-of-plane displacement falls below a calibrated threshold
(those pairs get no out-of-plane motion), because a freehand probe fanning or sweeping stops where it
turns back. The very first direction cannot be seen in the images at all (a scan and its mirror image
through the image plane decorrelate identically); it is the majority direction of the training scans
relative to a canonical one (positive mean elevational displacement), so on data whose first move goes
either way (the simulator draws it at random) the rule is right or wrong as a whole, scan by scan.
``moves`` keeps that structure but reads the scan as a sequence of *moves* (a fan, a twist about the
probe's axis), each swinging back and forth, and tells stops apart by their length. A run of fewer than
``min_run_pairs`` moving pairs is the magnitude flickering about the stop level as a move speeds up,
slows down or turns, and is passed over (no out-of-plane motion); a stop of fewer than ``turn_pairs``
pairs between the runs left changes nothing; a pair turning in plane by more than ``rock_deg`` (averaged
over a few pairs, so that tremor does not count) counts as stopped (a rock turns the plane within
itself, and the square patches, matched by translation only, decorrelate as they rotate: the curve reads
that as out-of-plane motion). A stop of fewer than ``pause_pairs`` is where a fan turns back, so the
direction reverses as under ``continuity``, unless the frames on either side of it say otherwise
(``turn_verdicts``: matched directly, they still correlate if the plane came back, and do not if it went
on through a stop that was only a dip in the measured size); a longer one is a pause, and there, and
where the kind of move changes, a new move starts in the direction moves of its kind started in on the
training scans (``move_signs``), whatever the last one did. Kinds: a *tilt* (fan: the whole image moves
one way, the mean displacement dominates) or a *twist* (the two sides of the image move opposite ways,
the lateral slope dominates). A mistake then lasts one move at most, and a fan mirrored as a whole
swings back to where it started (``oop_headroom.py``: right per move 80 % of the time is worth more than
90 % in runs of 50 pairs). The move's direction is a prior learned from the training scans: it is only
as good as the operators' habit (``simulate.py --habit``); without one it is a coin per move.

Conventions: ``utils.speckle``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import torch

from utils import transform as tf
from utils.errors import InputError
from utils.moves import MOVE_SPEED_DEG, move_segments
from utils.speckle import (MOVE_KINDS, RHO_CLIP_LOW, SIGN_CONTINUITY, SIGN_MOVES, SIGN_RULES, SIGN_ZERO,
                           MotionEstimate, PairMeasurements, SpeckleCalibration, as_frames, gram_of_kinds,
                           image_gram, measure_pairs, plane_of_transforms)

# What ``oracle_signs`` takes from the true motion to show where the ``moves`` rule loses (a diagnostic,
# never a prediction): the direction of each move's start, of each run, or of each pair.
ORACLES = ("move_starts", "runs", "pairs")
# Stop lengths (pairs) the calibration tries for the ``moves`` rule. On the simulated rotation scans
# (20 fps, stop level ~0.3 mm) the magnitude flickers below the stop level for 1-3 pairs as a move
# starts or ends, a fan turns back through 4-20 stopped pairs, and moves are 15-30 apart (pauses of
# 0.3-1 s and the slow ends of the moves around them).
TURN_CANDIDATES = (1, 2, 3, 4)
MIN_RUN_CANDIDATES = (1, 3, 5, 8)  # a half-swing of a fan lasts 0.6 s or more: 12 pairs
# In-plane turning per pair (degrees) above which a pair counts as rocked, not moved out of plane (0: no
# such gate). The protocol's rocks peak at about 1 degree per pair, a fan or twist turns the plane in
# itself by a few hundredths, drift and tremor by about 0.1.
ROCK_CANDIDATES_DEG = (0.0, 0.2, 0.35, 0.5)
# ... averaged over this many pairs about each (``rock_gated``): the hand's tremor turns the plane in
# itself back and forth by up to ~0.6 degrees from one pair to the next, and broke fans into pieces
# too short to count as runs (data/habit_dev, a fan after the quarter turn) when each pair was gated.
ROCK_SMOOTHING_PAIRS = 3
PAUSE_CANDIDATES = (4, 6, 8, 10, 12, 14, 16, 18, 20, 24, 28, 32)
# The ``moves`` rule's test of a turn (``turn_verdicts``): the two frames on either side of a short stop
# are matched directly, from where the run before it has moved the plane by about TURN_SPAN_MM RMS to
# where the run after it has moved it as far again. A fan that turned back brings the plane back near
# where it was (the two frames still correlate); one that went on, with a stop only in its measured
# size, carries it twice as far (they do not). A stop stays a turn unless going on explains the
# spanning pair's correlations better by TURN_MARGIN of the larger misfit; where both leave the frames
# decorrelated (a long stop) the misfits tie and the stop stays a turn. Both numbers were chosen on two
# development sets simulated for it and in no test (data/sim2025_dev and data/habit_dev: 3 subjects,
# seed 11, without and with a habit): of their 125 and 133 short stops, "every one a turn" got 84.8 %
# and 94.0 % right; the test with 3 mm (the spans then reach across most of a half-swing) and 0.6 gets
# 92.8 % and 97.0 %, and takes no turn for going on (a margin of 0.3: 96.8 % and 98.5 %, but a few
# turns taken for going on, which mirror the rest of a fan: worse GPE).
TURN_SPAN_MM = 3.0
TURN_MARGIN = 0.6
# The protocol's quarter turn (about the probe's axis, 80-100 degrees in 1.5-3 s) decorrelates most of
# the image from pair to pair, and its measured size saturates: on data/sim2025_dev the moves rule's
# quarter turns came out at 45-65 degrees of true 82-95, an error no direction can mend that stays in
# every frame after it. The calibration keeps the median quarter turn of the training scans' true
# motion (a twist move of more than QUARTER_TURN_MIN_DEG; ``calibrate_quarter_turn``) and the ``moves``
# rule resizes to it each twist it finds of more than QUARTER_TURN_DETECT of that
# (``sized_quarter_turns``): on data/habit_dev GPE 17.6 -> 10.3 mm, on data/sim2025_dev 37.5 -> 35.0
# (the training scans' quarter turn: 81.8 degrees; 90 would have given 9.3 and 35.1).
QUARTER_TURN_MIN_DEG = 45.0
QUARTER_TURN_DETECT = 0.35


# --------------------------------------------------------------------------------------------
# The rules
# --------------------------------------------------------------------------------------------


def orient_planes(plane: torch.Tensor, magnitude: torch.Tensor, gram: torch.Tensor, rule: str,
                  stop_threshold_mm: float = 0.0, initial_sign: int = 1, turn_pairs: int = 1, pause_pairs: int = 0,
                  move_signs=(1, 1), min_run_pairs: int = 1, continues=frozenset(),
                  kind_gram: torch.Tensor | None = None) -> torch.Tensor:
    """The sign (+1, -1 or 0) to give each pair's canonical out-of-plane field, pairs in scan order.

    Rules (``SIGN_RULES``):

    - ``zero``: 0 for every pair (no out-of-plane motion is predicted).
    - ``continuity``: a pair whose ``magnitude`` is below ``stop_threshold_mm`` is a *stop* and
      gets 0 (its estimate is mostly the noise floor of the curve). A moving pair keeps the
      direction of the previous moving pair: the sign that makes the inner product of the two
      fields over the patch grid (``p^T gram q``) positive; after a stop it takes the opposite one
      (the probe turned back). The first moving pair gets ``initial_sign``.
    - ``moves``: a run of fewer than ``min_run_pairs`` moving pairs is passed over (its pairs get 0,
      as stops do), and so is a stop of fewer than ``turn_pairs`` pairs between the runs left (the
      pairs on either side agree as neighbours do); after a stop of fewer than ``pause_pairs`` (a
      turn) as ``continuity``; after a longer one, where the kind of move changes, and at the first
      run, a move starts: its run takes the direction ``move_signs`` gives its kind (``_run_kind``: the
      kind carrying most of its magnitude; ``move_directions``). Runs whose index (among the runs left)
      is in ``continues`` go on in the direction of the run before them instead of turning back
      (``turn_verdicts``, which needs the frames: ``orient_moves``).

    Args:
        plane: [M, 3] canonical fields (``MotionEstimate.plane``); magnitude: [M] mm; gram: [3, 3];
        kind_gram: [3, 3] over which the ``moves`` rule tells kinds of move apart (None: ``gram``;
        ``MotionEstimate.kind_gram``).
    Returns:
        float64 [M].
    """
    if rule not in SIGN_RULES:
        raise InputError(f"sign rule {rule!r} is not one of {list(SIGN_RULES)}")
    signs = torch.zeros(len(plane), dtype=torch.float64)
    if rule == SIGN_ZERO:
        return signs
    if rule == SIGN_MOVES:
        if not 1 <= turn_pairs < pause_pairs:
            raise InputError(f"the {SIGN_MOVES!r} sign rule needs 1 <= turn_pairs < pause_pairs, got {turn_pairs} and "
                             f"{pause_pairs} (a speckle calibration made before the rule existed: calibrate again)")
        return _orient_moves(plane, magnitude, gram, stop_threshold_mm, turn_pairs, pause_pairs, move_signs,
                             min_run_pairs, continues=continues, kind_gram=kind_gram)
    # Inner products of each field with the next one; a sequential pass over M floats is cheap.
    moving = (magnitude >= stop_threshold_mm) & (magnitude > 0)
    previous = None
    for index in torch.nonzero(moving)[:, 0].tolist():
        if previous is None:
            sign = float(initial_sign)
        else:
            agree = float(plane[index] @ gram @ plane[previous]) >= 0
            sign = signs[previous].item() * (1.0 if agree else -1.0)
            if index > previous + 1:  # one or more stopped pairs in between: the probe turned back
                sign = -sign
        signs[index] = sign
        previous = index
    return signs


def move_directions(plane: torch.Tensor, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kind and canonical direction of each field, as the ``moves`` rule sees a move.

    A *tilt* (``MOVE_KINDS[0]``) moves the whole image one way: its mean displacement outweighs the
    lateral slope's spread over the points of ``gram``, and its canonical direction is the mean's sign. A
    *twist* (``MOVE_KINDS[1]``, turning about the probe's axis) moves the two sides of the image
    opposite ways: the canonical direction is the sign of the lateral slope ``p1``.

    Args:
        plane: [M, 3] fields ``(p0, p1, p2)``; gram: [3, 3] over the points the kind is judged on
            (``MotionEstimate.kind_gram``: the whole image).
    Returns:
        ``(kind, direction)``: long [M] indices into ``MOVE_KINDS`` and float64 [M] of +1 or -1.
    """
    points = gram[0, 0].clamp_min(1.0)  # gram[0] = sum of (1, x, y) over the grid
    mean_x = gram[0, 1] / points
    spread_x = (gram[1, 1] / points - mean_x.square()).clamp_min(0).sqrt()
    mean_displacement = plane @ gram[0] / points
    lateral = plane[:, 1] * spread_x
    twist = lateral.abs() > mean_displacement.abs()
    direction = torch.where(twist, lateral, mean_displacement)
    return twist.long(), torch.where(direction < 0, -1.0, 1.0).to(torch.float64)


def rock_gated(magnitude: torch.Tensor, angle: torch.Tensor, rock_deg: float) -> torch.Tensor:
    """``magnitude`` [M] with the pairs set to 0 where the in-plane ``angle`` [M] (radians), averaged over
    ``ROCK_SMOOTHING_PAIRS`` pairs about each, exceeds ``rock_deg`` degrees, so that the ``moves`` rule
    takes them for stops (``rock_deg`` 0: unchanged). A rock turns the plane in itself one way for a
    second or more; the hand's tremor turns it back and forth from pair to pair (aliased at 20 fps), by
    as much within a fan, and averages out."""
    if rock_deg <= 0:
        return magnitude
    half = ROCK_SMOOTHING_PAIRS // 2
    padded = torch.nn.functional.pad(angle[None, None], (half, half), mode="replicate")[0, 0]
    smoothed = padded.unfold(0, ROCK_SMOOTHING_PAIRS, 1).mean(-1)
    return torch.where(smoothed.abs() > math.radians(rock_deg), torch.zeros_like(magnitude), magnitude)


def _moving_runs(plane: torch.Tensor, magnitude: torch.Tensor, gram: torch.Tensor, stop_threshold_mm: float,
                 turn_pairs: int = 1, min_run_pairs: int = 1) -> list[tuple[list[int], torch.Tensor]]:
    """Runs of moving pairs in scan order: ``(pair indices, signs)`` where the signs (float64, +1 or -1,
    the first +1) keep each moving pair's field agreeing with the one before it.

    Consecutive moving pairs form runs; runs of fewer than ``min_run_pairs`` pairs are dropped first
    (so that the flicker about the stop level where a fan turns back cannot bridge the turn), then
    runs fewer than ``turn_pairs`` stopped pairs apart are joined.
    """
    moving = torch.nonzero((magnitude >= stop_threshold_mm) & (magnitude > 0))[:, 0].tolist()
    pieces, current = [], []
    for index in moving:
        if current and index > current[-1] + 1:
            pieces.append(current)
            current = []
        current.append(index)
    if current:
        pieces.append(current)
    runs = []
    for piece in (piece for piece in pieces if len(piece) >= min_run_pairs):
        if runs and piece[0] - runs[-1][-1] - 1 < turn_pairs:
            runs[-1] = runs[-1] + piece
        else:
            runs.append(piece)
    result = []
    for pairs in runs:
        # The inner product of each field with the next one decides whether the sign carries on.
        agree = (plane[pairs[1:]] @ gram * plane[pairs[:-1]]).sum(-1) >= 0
        steps = torch.where(agree, 1.0, -1.0).to(torch.float64)
        result.append((pairs, torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(steps, 0)])))
    return result


def _starts_move(gap: int, kind: int, last_kind, pause_pairs: int) -> bool:
    """Whether a run starts a move under the ``moves`` rule: the scan's first run (``gap`` -1), one after a
    pause (a stop of ``pause_pairs`` or more), or one of another kind than the run before: a fan does not
    turn back as a twist. Any other run follows a turn."""
    return gap < 0 or gap >= pause_pairs or kind != last_kind


def _run_kind(kinds: torch.Tensor, magnitude: torch.Tensor, pairs: list[int]) -> int:
    """A run's kind of move: the kind whose pairs carry most of the run's summed magnitude (``kinds`` from
    ``move_directions``; a tie: the first). Not that of its strongest pair alone: a twist's pairs where
    few patches correlate are now and then fitted as a tilt about a line across the image, the strongest
    of them too (data/habit_dev2: 9 of a quarter turn's 33 pairs, which was taken for a fan and given a
    fan's direction)."""
    index = torch.as_tensor(pairs)
    weight = torch.zeros(len(MOVE_KINDS), dtype=torch.float64).index_add_(0, kinds[index],
                                                                          magnitude[index].to(torch.float64))
    return int(torch.argmax(weight))


def _run_direction(kinds: torch.Tensor, directions: torch.Tensor, magnitude: torch.Tensor, pairs: list[int],
                   relative: torch.Tensor, kind: int) -> float:
    """The canonical direction (``move_directions``) of a run of ``kind``, relative to the signs ``relative``
    chained along it: that of its strongest pair of that kind."""
    index = torch.as_tensor(pairs)
    strongest = int(torch.argmax(torch.where(kinds[index] == kind, magnitude[index].to(torch.float64), -1.0)))
    return float(directions[pairs[strongest]]) * float(relative[strongest])


def _orient_moves(plane, magnitude, gram, stop_threshold_mm: float, turn_pairs: int, pause_pairs: int, move_signs,
                  min_run_pairs: int = 1, runs=None, continues=frozenset(), kind_gram=None) -> torch.Tensor:
    """The ``moves`` rule (``orient_planes``); ``runs``: ``_moving_runs`` already made with ``turn_pairs`` and
    ``min_run_pairs``; ``continues``: indices of the runs that go on across the stop before them;
    ``kind_gram``: over which the kinds of move are told apart (None: ``gram``)."""
    signs = torch.zeros(len(plane), dtype=torch.float64)
    kinds, directions = move_directions(plane, gram if kind_gram is None else kind_gram)
    if runs is None:
        runs = _moving_runs(plane, magnitude, gram, stop_threshold_mm, turn_pairs, min_run_pairs)
    previous, previous_kind = None, None  # the last pair of the run before, and that run's kind
    previous_field = None  # the sum of the run before's fields as oriented
    for index, (pairs, relative) in enumerate(runs):
        kind = _run_kind(kinds, magnitude, pairs)
        field = _run_field(plane, pairs, relative)
        if _starts_move(-1 if previous is None else pairs[0] - previous - 1, kind, previous_kind, pause_pairs):
            start = move_signs[kind] * _run_direction(kinds, directions, magnitude, pairs, relative, kind)
        else:  # a turn: the opposite of the direction of the run before (or the same, if it went on)
            start = (1.0 if index in continues else -1.0) * _agreement(previous_field, field, gram)
        signs[pairs] = start * relative
        previous, previous_kind, previous_field = pairs[-1], kind, start * field
    return signs


def _run_field(plane: torch.Tensor, pairs: list[int], relative: torch.Tensor) -> torch.Tensor:
    """The sum [3] of a run's fields as ``_moving_runs`` chains them (its first pair +1). Runs are compared
    by these sums, not by their end pairs: where a fan turns, the pairs on either side move least and
    their fields are the noisiest of the run."""
    return (plane[pairs] * relative[:, None]).sum(0)


def _agreement(field: torch.Tensor, other: torch.Tensor, gram: torch.Tensor) -> float:
    """+1 if the two fields [3] point the same way over the grid (``p^T gram q >= 0``), else -1."""
    return 1.0 if float(field @ gram @ other) >= 0 else -1.0


def _partial_field(fields: torch.Tensor, gram: torch.Tensor, target_mm: float) -> tuple[torch.Tensor, int]:
    """The sum of the first ``count`` fields [n, 3] and ``count``: the fewest whose sum reaches ``target_mm``
    RMS over the grid (all of them if none does)."""
    points = max(float(gram[0, 0]), 1.0)
    total = torch.cumsum(fields, 0)
    rms = ((total @ gram * total).sum(-1) / points).clamp_min(0).sqrt()
    reached = torch.nonzero(rms >= target_mm)[:, 0]
    count = int(reached[0]) + 1 if len(reached) else len(fields)
    return total[count - 1], count


def correlation_misfit(field: torch.Tensor, measurements: PairMeasurements, calibration: SpeckleCalibration,
                       pair: int = 0) -> float:
    """How badly the field [3] ``d = p0 + p1 x + p2 y`` explains one measured pair's patch correlations:
    ``sum_k (max(rho_k, floor) - max(rho0 exp(-d_k^2 / (2 sigma^2)), floor))^2`` over its usable patches
    (``_refine_plane``'s cost with unit weights)."""
    centres = measurements.centres_mm
    band = calibration.band_of(centres[:, 1].contiguous())
    sigma = torch.as_tensor(calibration.sigma_mm, dtype=torch.float64)[band]
    rho0 = torch.as_tensor(calibration.rho0, dtype=torch.float64)[band]
    floor = max(calibration.settings.rho_min, RHO_CLIP_LOW)
    d = field[0] + field[1] * centres[:, 0] + field[2] * centres[:, 1]
    model = (rho0 * torch.exp(-d.square() / (2 * sigma.square()))).clamp_min(floor)
    residual = measurements.peak[pair].clamp_min(floor) - model
    return float((measurements.usable[pair] * residual.square()).sum())


def turn_verdicts(frames, scale, estimate: MotionEstimate, magnitude: torch.Tensor, runs,
                  calibration: SpeckleCalibration) -> frozenset:
    """The runs (indices into ``runs``) that go on in the direction of the run before them across a short
    stop, where the ``moves`` rule would otherwise turn back (module constants ``TURN_SPAN_MM``).

    For each run that follows a turn, frames a (``TURN_SPAN_MM`` back into the run before, by the
    chained fields) and b (as far into the run after) are matched; the field between them is the sum
    of the fields in between, with the run after, and the second half of the stop, either continuing
    or reversed; the run goes on where continuing leaves the smaller ``correlation_misfit`` by
    ``TURN_MARGIN`` of the larger.

    Args:
        frames: uint8 [N, H, W] of the scan (as measured); scale: ``S``.
        estimate: ``estimate_motion`` of its consecutive pairs (pair m: frames m and m + 1);
        magnitude: [M] as the rule saw it (rock-gated); runs: ``_moving_runs``.
    """
    frames = as_frames(frames)
    kinds, _ = move_directions(estimate.plane, gram_of_kinds(estimate))
    plane, gram = estimate.plane, estimate.gram
    tests = []  # (run index, frame a, frame b, field if it goes on, field if it turns)
    previous, previous_kind, previous_fields = None, None, None
    for index, (pairs, relative) in enumerate(runs):
        kind = _run_kind(kinds, magnitude, pairs)
        # The run before, oriented so that its last pair is +1; this run oriented to go on from it.
        fields = plane[pairs] * relative[:, None]
        if not _starts_move(-1 if previous is None else pairs[0] - previous[-1] - 1, kind, previous_kind,
                            calibration.pause_pairs):
            after = fields * _agreement(previous_fields.sum(0), fields.sum(0), gram)
            stop = list(range(previous[-1] + 1, pairs[0]))
            half = len(stop) // 2
            stop_before = _oriented_sum(plane[stop[:half]], gram, previous_fields[-1])
            stop_after = _oriented_sum(plane[stop[half:]], gram, after[0])
            back, count_back = _partial_field(previous_fields.flip(0), gram, TURN_SPAN_MM)
            ahead, count_ahead = _partial_field(after, gram, TURN_SPAN_MM)
            frame_a, frame_b = previous[-count_back], pairs[count_ahead - 1] + 1
            tests.append((index, frame_a, frame_b, back + stop_before + stop_after + ahead,
                          back + stop_before - stop_after - ahead))
        previous, previous_kind = pairs, kind
        previous_fields = fields / relative[-1]
    if not tests:
        return frozenset()
    # One measurement of every spanning pair: frames a0, b0, a1, b1, ... matched b_i against a_i.
    stacked = frames[[frame for _, a, b, _, _ in tests for frame in (a, b)]]
    measured = measure_pairs(stacked, scale, calibration.settings, moving=range(1, 2 * len(tests), 2))
    continues = set()
    for number, (index, _, _, going_on, turning) in enumerate(tests):
        cost_on = correlation_misfit(going_on, measured, calibration, number)
        cost_turn = correlation_misfit(turning, measured, calibration, number)
        if cost_turn - cost_on > TURN_MARGIN * max(cost_on, cost_turn):
            continues.add(index)
    return frozenset(continues)


def _oriented_sum(fields: torch.Tensor, gram: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The sum of ``fields`` [n, 3], each turned to agree with ``reference`` [3] over the grid."""
    agree = (fields @ gram @ reference) >= 0
    return torch.where(agree[:, None], fields, -fields).sum(0)


def orient_moves(frames, scale, estimate: MotionEstimate, calibration: SpeckleCalibration, oracle: str | None = None,
                 true_plane: torch.Tensor | None = None) -> tuple[torch.Tensor, MotionEstimate]:
    """The ``moves`` rule for a scan: its signs [M], with the short stops tested (``turn_verdicts``), and
    ``estimate`` with its quarter turns sized (``sized_quarter_turns``).

    ``oracle`` (one of ``ORACLES``, with the true fields ``true_plane`` [M, 3] of the pairs) replaces part
    of the rule's directions by the true ones (``oracle_signs``) before the quarter turns are sized.
    """
    magnitude = rock_gated(estimate.magnitude, estimate.angle, calibration.rock_deg)
    runs = _moving_runs(estimate.plane, magnitude, estimate.gram, calibration.stop_threshold_mm,
                        calibration.turn_pairs, calibration.min_run_pairs)
    continues = turn_verdicts(frames, scale, estimate, magnitude, runs, calibration)
    signs = _orient_moves(estimate.plane, magnitude, estimate.gram, calibration.stop_threshold_mm,
                          calibration.turn_pairs, calibration.pause_pairs, calibration.move_signs,
                          calibration.min_run_pairs, runs=runs, continues=continues, kind_gram=gram_of_kinds(estimate))
    if oracle is not None:
        signs = oracle_signs(signs, estimate.plane, magnitude, gram_of_kinds(estimate), runs, true_plane, oracle,
                             calibration.pause_pairs)
    return signs, sized_quarter_turns(estimate, signs, magnitude, runs, calibration)


def oracle_signs(signs: torch.Tensor, plane: torch.Tensor, magnitude: torch.Tensor, gram: torch.Tensor, runs,
                 true_plane: torch.Tensor, oracle: str, pause_pairs: int) -> torch.Tensor:
    """The ``moves`` rule's ``signs`` [M] with part of the direction taken from the true fields ``true_plane``
    [M, 3]: where the rule loses, never a prediction (it reads the truth).

    - ``move_starts``: each move (a run that starts one, ``_starts_move``, with the runs that follow it
      across turns) turned as a whole to agree with the true fields of its first run; the turns within it
      stay the rule's.
    - ``runs``: each run turned as a whole to agree with its own true fields.
    - ``pairs``: every pair with a measured field given its true direction, stops and rocks included (the
      best any sign can do with the measured sizes).

    "Agree": the summed oriented fields' inner product with the summed true ones, ``p^T gram q``, is
    positive (a tie keeps the rule's). ``plane``, ``magnitude`` (as the rule saw it), ``gram`` (over which
    it told the kinds of move apart: ``orient_moves`` passes ``MotionEstimate.kind_gram``, the image's, over
    which the sign accuracy is scored too), ``runs``: as the rule used them.
    """
    if oracle not in ORACLES:
        raise InputError(f"oracle {oracle!r} is not one of {list(ORACLES)}")
    if true_plane is None or true_plane.shape != plane.shape:
        raise InputError(f"the {oracle!r} oracle needs the true fields of the {len(plane)} pairs, got "
                         f"{None if true_plane is None else tuple(true_plane.shape)}")
    true_plane = true_plane.to(torch.float64)
    if oracle == "pairs":
        inner = (plane @ gram * true_plane).sum(-1)
        return torch.where(inner < 0, -1.0, torch.where(inner > 0, 1.0, signs)).to(torch.float64)

    def agreement(pairs: list[int]) -> float:
        inner = float((plane[pairs] * signs[pairs, None]).sum(0) @ gram @ true_plane[pairs].sum(0))
        return -1.0 if inner < 0 else 1.0

    result = signs.clone()
    kinds, _ = move_directions(plane, gram)
    previous, previous_kind, flip = None, None, 1.0
    for pairs, _ in runs:
        kind = _run_kind(kinds, magnitude, pairs)
        if oracle == "runs" or _starts_move(-1 if previous is None else pairs[0] - previous - 1, kind,
                                            previous_kind, pause_pairs):
            flip = agreement(pairs)
        result[pairs] = flip * signs[pairs]
        previous, previous_kind = pairs[-1], kind
    return result


def sized_quarter_turns(estimate: MotionEstimate, signs: torch.Tensor, magnitude: torch.Tensor, runs,
                        calibration: SpeckleCalibration) -> MotionEstimate:
    """``estimate`` with each quarter turn's fields turned about the probe's axis and scaled to the
    calibrated size (module constants ``QUARTER_TURN_MIN_DEG``); unchanged where
    ``calibration.quarter_turn_deg`` is 0.

    A twist is a stretch of runs of the twist kind, fewer than ``pause_pairs`` stopped pairs apart; one
    whose net a_Y, with ``signs`` [M] as the ``moves`` rule gave them, exceeds ``QUARTER_TURN_DETECT`` of
    the calibrated quarter turn is one. Each of its fields is replaced by the turn about the probe's
    axis (the image's lateral middle) nearest to it over the image (``about_probe_axis``), and they are
    scaled by the calibrated size over their net a_Y (magnitudes recomputed). ``magnitude`` [M] and
    ``runs``: as the rule saw them (``orient_moves``).
    """
    if calibration.quarter_turn_deg <= 0:
        return estimate
    kinds, _ = move_directions(estimate.plane, gram_of_kinds(estimate))
    twist = MOVE_KINDS.index("twist")
    twists, current, previous = [], [], None  # stretches of twist runs (pair indices)
    for pairs, _ in runs:
        is_twist = _run_kind(kinds, magnitude, pairs) == twist
        if is_twist and current and pairs[0] - previous - 1 < calibration.pause_pairs:
            current = current + pairs
        else:
            twists.append(current)
            current = list(pairs) if is_twist else []
        previous = pairs[-1]
    twists.append(current)
    a_y = motion_parameters(estimate, signs)[:, 1]
    plane, sized_magnitude = estimate.plane.clone(), estimate.magnitude.clone()
    points = estimate.gram[0, 0].clamp_min(1.0)  # the grid's patch count: magnitudes are RMS over it
    for pairs in (pairs for pairs in twists if pairs):
        net = abs(math.degrees(float(a_y[pairs].sum())))
        if net > QUARTER_TURN_DETECT * calibration.quarter_turn_deg:
            turned = about_probe_axis(estimate.plane[pairs], gram_of_kinds(estimate))
            net = abs(math.degrees(float(-torch.asin((turned[:, 1] * signs[pairs]).clamp(-1, 1)).sum())))
            plane[pairs] = turned * (calibration.quarter_turn_deg / net if net > 0 else 0.0)
            energy = (plane[pairs] @ estimate.gram * plane[pairs]).sum(-1)
            sized_magnitude[pairs] = energy.div(points).clamp_min(0).sqrt()
    return dataclasses.replace(estimate, plane=plane, magnitude=sized_magnitude)


def about_probe_axis(plane: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """The fields [M, 3] of turns about the probe's axis nearest to ``plane`` [M, 3] over the points of
    ``gram`` (the image's: ``MotionEstimate.kind_gram``): ``p1 (x - x_m)``, x_m the points' lateral middle.

    The protocol's quarter turn is a rotation about the probe's axis, which moves the image out of plane
    by ``-sin(a_Y) (x - x_m)``, not at all along depth. The measured fields of its pairs have a depth slope
    too (a_X: 28.5 degrees over one quarter turn of data/habit_dev2, 1.3 in the true motion), which a
    twist's decorrelation pins poorly: most of the image decorrelates and the few patches left that
    correlate are read through a curve fitted on the training scans' small transverse moves. A
    least-squares projection over the image onto the one field that is a turn about the axis keeps the
    part of each field the turn explains.
    """
    middle = gram[0, 1] / gram[0, 0].clamp_min(1.0)
    axis = torch.stack([-middle, torch.ones_like(middle), torch.zeros_like(middle)]).to(plane.dtype)
    return (plane @ gram @ axis / (axis @ gram @ axis))[:, None] * axis


def calibrate_quarter_turn(local_transforms) -> float:
    """The median net turn about the probe's axis (degrees) of the quarter turns in true motion: the
    moves (``utils.moves.move_segments``) whose net a_Y exceeds ``QUARTER_TURN_MIN_DEG``, but for one
    that the end of its scan cuts short; 0 if none.

    Args:
        local_transforms: iterable of [N, 4, 4] true ``T_{i-1<-i}`` of training scans (whole scans: the
            quarter turn comes after the first fan and rock).
    """
    turns = []
    for local in local_transforms:
        local = torch.as_tensor(local, dtype=torch.float64)
        if not len(local):
            continue
        segments = torch.from_numpy(move_segments(local))
        a_y = tf.matrix_to_params(local)[:, 1]
        net = torch.zeros(int(segments.max()) + 1, dtype=torch.float64).index_add_(0, segments, a_y).abs()
        if math.degrees(float(a_y[-5:].abs().mean())) > MOVE_SPEED_DEG:
            net = net[:-1]  # still turning when the scan ends: a quarter turn cut short, not its size
        turns.extend(math.degrees(float(value)) for value in net if math.degrees(float(value)) > QUARTER_TURN_MIN_DEG)
    return float(np.median(turns)) if turns else 0.0


def sign_agreement(plane_pred: torch.Tensor, plane_true: torch.Tensor, gram: torch.Tensor,
                   min_rms_mm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Whether predicted and true out-of-plane fields point the same way.

    Args:
        plane_pred, plane_true: [M, 3] fields (``plane_of_transforms``); gram: [3, 3] over P points.
        min_rms_mm: pairs whose true field's RMS over the points is at most this are not counted
            (no direction to get right), nor are pairs whose predicted field is zero (no sign given).
    Returns:
        ``(agree, counted)``: bool [M] each; ``agree`` where ``plane_pred^T gram plane_true > 0``.
    """
    points = float(gram[0, 0]) if float(gram[0, 0]) > 0 else 1.0  # gram[0, 0] = sum of 1 = P
    true_rms = ((plane_true @ gram * plane_true).sum(-1) / points).clamp_min(0).sqrt()
    pred_energy = (plane_pred @ gram * plane_pred).sum(-1)
    counted = (true_rms > min_rms_mm) & (pred_energy > 0)
    agree = (plane_pred @ gram * plane_true).sum(-1) > 0
    return agree & counted, counted


def out_of_plane_sign_pairs(local_pred, local_true, scale, height: int, width: int,
                            min_rms_mm: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each pair's out-of-plane direction judged over the image (a 3 x 3 point lattice).

    Args:
        local_pred, local_true: [M, 4, 4] ``T_{i-1<-i}`` (image mm).
        scale: ``S``; height, width: the frame size (pixels).
        min_rms_mm: see ``sign_agreement``.
    Returns:
        ``(agreeing, counted, moving)``: bool [M] each. ``moving`` pairs have more than ``min_rms_mm``
        of true out-of-plane motion, ``counted`` ones of them were given a direction, ``agreeing``
        ones got it right.
    """
    gram = image_gram(scale, height, width)
    plane_true = plane_of_transforms(torch.as_tensor(local_true, dtype=torch.float64))
    agree, counted = sign_agreement(plane_of_transforms(torch.as_tensor(local_pred, dtype=torch.float64)),
                                    plane_true, gram, min_rms_mm)
    _, moving = sign_agreement(plane_true, plane_true, gram, min_rms_mm)
    return agree, counted, moving


def out_of_plane_sign_accuracy(local_pred, local_true, scale, height: int, width: int,
                               min_rms_mm: float = 0.1) -> tuple[int, int, int]:
    """``(agreeing, counted, moving)`` pair counts of ``out_of_plane_sign_pairs``. The accuracy is
    ``agreeing / counted`` (undefined when nothing is counted, e.g. for the ``zero`` rule, which gives
    no direction)."""
    agree, counted, moving = out_of_plane_sign_pairs(local_pred, local_true, scale, height, width, min_rms_mm)
    return int(agree.sum()), int(counted.sum()), int(moving.sum())


def motion_parameters(estimate: MotionEstimate, signs: torch.Tensor) -> torch.Tensor:
    """``[a_Z, a_Y, a_X, t_x, t_y, t_z]`` [M, 6] of each pair from its estimate and out-of-plane sign.

    The z row of ``Rz(a_Z) Ry(a_Y) Rx(a_X)`` is ``(-sin a_Y, cos a_Y sin a_X, cos a_Y cos a_X)``, so the
    field ``d = p0 + p1 x + p2 y`` gives ``a_Y = -asin(p1)``, ``a_X = asin(p2 / cos a_Y)``, ``t_z = p0``
    exactly; the in-plane angle and translation are the 2-D fit's (exact to first order in the
    out-of-plane angles, which mix into the in-plane rows only at second order).
    """
    plane = estimate.plane * signs[:, None]
    a_y = -torch.asin(plane[:, 1].clamp(-1, 1))
    a_x = torch.asin((plane[:, 2] / torch.cos(a_y)).clamp(-1, 1))
    return torch.stack([estimate.angle, a_y, a_x, estimate.translation[:, 0], estimate.translation[:, 1],
                        plane[:, 0]], dim=-1)


# --------------------------------------------------------------------------------------------
# Calibrating the ``moves`` rule
# --------------------------------------------------------------------------------------------


def calibrate_moves(estimates, stop_threshold_mm: float, rock_candidates=ROCK_CANDIDATES_DEG,
                    turn_candidates=TURN_CANDIDATES, min_run_candidates=MIN_RUN_CANDIDATES,
                    pause_candidates=PAUSE_CANDIDATES) -> tuple[float, int, int, int, tuple[int, ...]]:
    """The ``moves`` rule's rock gate, shortest turn, shortest run, pause and move directions from training
    scans.

    For each candidate rock gate (degrees), turn, run and pause (pairs), every run that starts a move
    votes, for its kind, the direction relative to the canonical one that its true fields need (the
    sign of their inner product with the run's fields as ``_moving_runs`` chains them); the majority
    per kind is ``move_signs`` (+1 on a tie or without votes). The candidates kept are those whose
    rule, with their own votes, leaves the least squared error of the out-of-plane fields over the
    patch grid, summed over the scans (the first such in the candidates' order on a tie).

    Args:
        estimates: ``[(MotionEstimate, true planes [M, 3])]`` of the training scans (``calibrate``).
        stop_threshold_mm: the stop level (``best_stop_threshold``).
    Returns:
        ``(rock_deg, turn_pairs, min_run_pairs, pause_pairs, move_signs)``.
    """
    directions = [move_directions(estimate.plane, gram_of_kinds(estimate)) for estimate, _ in estimates]
    best, best_cost = None, math.inf
    for rock, turn, min_run in itertools.product(rock_candidates, turn_candidates, min_run_candidates):
        scans = [_run_summaries(estimate, true_plane, kinds, stop_threshold_mm, rock, turn, min_run)
                 for (estimate, true_plane), kinds in zip(estimates, directions)]
        for pause in pause_candidates:
            if pause <= turn:
                continue
            move_signs = _vote_move_signs(scans, pause)
            cost = sum(_moves_cost(scan, pause, move_signs) for scan in scans)
            if best is None or cost < best_cost - 1e-9 * max(1.0, abs(best_cost)):
                best, best_cost = (float(rock), turn, min_run, pause, move_signs), cost
    if best is None:
        raise InputError(f"no pause candidate {list(pause_candidates)} exceeds a turn candidate {list(turn_candidates)}")
    return best


@dataclasses.dataclass
class _RunSummary:
    """What ``calibrate_moves`` needs of one run of moving pairs: the ``moves`` rule's choices and the
    field error for either start sign s (``constant - 2 s overlap``), so that candidates are compared
    without orienting every pair again."""

    gap: int  # stopped pairs before the run (-1: the scan's first run)
    kind: int  # ``_run_kind``
    move_factor: float  # the start sign is move_signs[kind] * move_factor at a move's start
    turn_factor: float  # ... and -(the last run's start sign) * turn_factor after a turn
    constant: float  # sum over its pairs of |chained field|^2 + |true field|^2 over the grid
    overlap: float  # sum over its pairs of <chained field, true field> over the grid


def _run_summaries(estimate: MotionEstimate, true_plane: torch.Tensor, kinds, stop_threshold_mm: float, rock: float,
                   turn: int, min_run: int) -> tuple[float, list[_RunSummary]]:
    """``(error of the pairs outside every run, [_RunSummary per run])`` of one scan (``calibrate_moves``)."""
    kind, direction = kinds
    runs = _moving_runs(estimate.plane, rock_gated(estimate.magnitude, estimate.angle, rock), estimate.gram,
                        stop_threshold_mm, turn, min_run)
    gram = estimate.gram
    true_energy = (true_plane @ gram * true_plane).sum(-1)
    outside = float(true_energy.sum())
    summaries, previous, previous_field = [], None, None  # the last pair of the run before, and its fields' sum
    for pairs, relative in runs:
        chained = estimate.plane[pairs] * relative[:, None]
        run_kind = _run_kind(kind, estimate.magnitude, pairs)
        field = _run_field(estimate.plane, pairs, relative)
        turn_factor = 1.0 if previous_field is None else _agreement(previous_field, field, gram)
        own = float(true_energy[pairs].sum())
        outside -= own
        summaries.append(_RunSummary(
            gap=-1 if previous is None else pairs[0] - previous - 1, kind=run_kind,
            move_factor=_run_direction(kind, direction, estimate.magnitude, pairs, relative, run_kind),
            turn_factor=turn_factor,
            constant=float((chained @ gram * chained).sum()) + own,
            overlap=float((chained @ gram * true_plane[pairs]).sum())))
        previous, previous_field = pairs[-1], field
    return outside, summaries


def _run_starts(summaries: list[_RunSummary], pause: int, move_signs):
    """Yield ``(summary, start sign, starts a move)`` for each run, as ``_orient_moves`` decides them with
    every short stop a turn."""
    last_sign, last_kind = 0.0, None  # the start sign of the run before, and its kind
    for summary in summaries:
        move = _starts_move(summary.gap, summary.kind, last_kind, pause)
        start = move_signs[summary.kind] * summary.move_factor if move else -last_sign * summary.turn_factor
        yield summary, start, move
        last_sign, last_kind = start, summary.kind


def _moves_cost(scan, pause: int, move_signs) -> float:
    """The ``moves`` rule's squared field error over one scan (``_run_summaries``' output)."""
    outside, summaries = scan
    return outside + sum(summary.constant - 2 * start * summary.overlap
                         for summary, start, _ in _run_starts(summaries, pause, move_signs))


def _vote_move_signs(scans, pause: int) -> tuple[int, ...]:
    """``calibrate_moves``' majority direction per kind of the runs that start a move."""
    votes = [0] * len(MOVE_KINDS)
    for _, summaries in scans:
        for summary, _, move in _run_starts(summaries, pause, (1,) * len(MOVE_KINDS)):
            if move:
                needed = (summary.overlap > 0) - (summary.overlap < 0)
                votes[summary.kind] += int(needed * summary.move_factor)
    return tuple(-1 if vote < 0 else 1 for vote in votes)


def best_stop_threshold(estimates) -> float:
    """The ``continuity`` stop threshold minimising the out-of-plane field error (see ``calibrate``)."""
    magnitudes = torch.cat([estimate.magnitude for estimate, _ in estimates])
    if not len(magnitudes):
        return 0.0
    candidates = torch.cat([torch.zeros(1, dtype=torch.float64),
                            torch.quantile(magnitudes, torch.linspace(0.02, 0.8, 40, dtype=torch.float64))])
    best, best_cost = 0.0, math.inf
    for threshold in candidates.tolist():
        cost = 0.0
        for estimate, true_plane in estimates:
            signs = orient_planes(estimate.plane, estimate.magnitude, estimate.gram, SIGN_CONTINUITY, threshold, 1)
            oriented = estimate.plane * signs[:, None]
            costs = []
            for direction in (1.0, -1.0):
                error = direction * oriented - true_plane
                costs.append(float((error @ estimate.gram * error).sum()))
            cost += min(costs)
        if cost < best_cost - 1e-12:
            best, best_cost = threshold, cost
    return best

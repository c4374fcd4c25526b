"""Classical speckle tracking: a pose estimator without learned weights, the floor learned models must beat.

What it is for
--------------
``predict_scan_speckle`` gives every frame of a scan a transform from the images alone, in exactly the
form ``utils.evaluation.predict_transforms`` returns for a network (global ``T_{0<-i}``, local
``T_{i-1<-i}``, float64 CPU [N-1, 4, 4], seconds), so ``generate_DDF.py --method speckle`` scores it
with the same tables, files and plots. It needs no training, only a small calibration of the speckle
decorrelation curve (``calibrate``) made on the training fold.

The physics
-----------
Speckle is the interference pattern of sub-resolution scatterers fixed to the tissue.

- *In-plane* motion (a_Z, t_x, t_y) moves the pattern within the image: a patch of frame i is found
  again in frame i-1, displaced. A fixed grid of square patches (``SpeckleSettings.patch_px``, full
  resolution) is placed where the image holds signal (patches that are mostly black, outside the
  scan-converted sector or in a bone shadow, are skipped, whatever the frame size); each patch of
  frame i is located in a search window of frame i-1 by normalised cross-correlation (NCC, computed
  with FFTs, batched over pairs and patches), refined to sub-pixel by a parabola through the peak
  and its neighbours on each axis. The patch centres ``c`` (image mm) and their matched positions
  ``c + s`` are the same tissue points seen from frames i and i-1, so a weighted least-squares 2-D
  rigid fit (rotation about the image normal plus translation) of ``c -> c + s`` *is* the in-plane
  part of ``T_{i-1<-i}``. A few iteratively re-weighted passes (Tukey's biweight on the residuals,
  base weights from the peak correlation) make it robust to mismatched patches.
- *Out-of-plane* motion (a_Y, a_X, t_z) moves the scatterers through the elevational beam profile:
  the pattern does not move, it decorrelates. For fully developed speckle the intensity correlation
  falls with the elevational displacement d of a patch as ``rho0 exp(-d^2 / (2 sigma^2))``, with
  sigma set by the elevational beam width, which depends on depth (narrow at the elevational focus,
  wide above and below it; ``/work/shared/SIMULATOR.md``), and ``rho0 < 1`` the correlation left at
  d = 0 (noise, interpolation, in-plane deformation). ``calibrate`` fits sigma and rho0 per depth
  band on training pairs, where the true displacement of each patch centre c is the z component of
  ``T_{i-1<-i} c - c``. Inverting the curve gives each patch's |d|. A rigid motion displaces the
  image plane elevationally by an affine function of the in-plane position,
  ``d(x, y) = t_z - sin(a_Y) x + cos(a_Y) sin(a_X) y`` (the z row of ``Rz Ry Rx``), so
  ``d^2 = (q . u)^2`` with ``u = (1, x, y)``: a linear least-squares fit of the quadratic form
  ``d^2 = u^T M u`` followed by the best rank-1 ``M = q q^T`` (the leading eigenvector) recovers the
  plane q, hence (t_z, a_Y, a_X), up to one sign per pair, whether or not the plane crosses zero in
  the image (fanning about the skin contact point does not, twisting about the probe axis does).
  That start is refined by fitting the correlations themselves (Levenberg-Marquardt), where a fully
  decorrelated patch only bounds |d| from below instead of pinning it to the curve's floor.
- *The sign.* Decorrelation is symmetric: it says how far, never which way. ``SIGN_RULES``:
  ``zero`` predicts no out-of-plane motion at all (the default: a wrong sign doubles the error and
  then accumulates in the global transforms); ``continuity`` assumes a smooth hand: the direction
  of the out-of-plane motion field is kept from pair to pair (the sign that makes consecutive
  fields agree), and it is reversed after each *stop*, a run of pairs whose estimated out-of-plane
  displacement falls below a calibrated threshold (those pairs get no out-of-plane motion),
  because a freehand probe fanning or sweeping stops where it turns back. The very first direction
  cannot be seen in the images at all (a scan and its mirror image through the image plane
  decorrelate identically); it is the majority direction of the training scans relative to a
  canonical one (positive mean elevational displacement), so on data whose first move goes either
  way (the simulator draws it at random) the rule is right or wrong as a whole, scan by scan.
  ``moves`` keeps that structure but reads the scan as a sequence of *moves* (a fan, a twist about
  the probe's axis), each swinging back and forth, and tells stops apart by their length. A run of
  fewer than ``min_run_pairs`` moving pairs is the magnitude flickering about the stop level as a
  move speeds up, slows down or turns, and is passed over (no out-of-plane motion); a stop of fewer
  than ``turn_pairs`` pairs between the runs left changes nothing; a pair turning in plane by more
  than ``rock_deg`` (averaged over a few pairs, so that tremor does not count) counts as stopped (a
  rock turns the plane within itself, and the square patches, matched by translation only,
  decorrelate as they rotate: the curve reads that as out-of-plane motion). A stop of fewer than
  ``pause_pairs`` is where a fan turns back, so the direction reverses as under ``continuity``,
  unless the frames on either side of it say otherwise (``turn_verdicts``: matched directly, they
  still correlate if the plane came back, and do not if it went on through a stop that was only a
  dip in the measured size); a longer one is a pause, and there, and where the
  kind of move changes, a new move starts in the direction moves of its kind started in on the
  training scans (``move_signs``), whatever the last one did. Kinds: a *tilt* (fan: the whole image
  moves one way, the mean displacement dominates) or a *twist* (the two sides of the image move
  opposite ways, the lateral slope dominates). A mistake then lasts one move at most, and a fan
  mirrored as a whole swings back to where it started (``oop_headroom.py``: right per move 80 % of
  the time is worth more than 90 % in runs of 50 pairs). The move's direction is a prior learned
  from the training scans: it is only as good as the operators' habit (``simulate.py --habit``);
  without one it is a coin per move.

Conventions (``utils.transform``, DESIGN.md section 2): image mm ``x = column * S[0, 0]``,
``y = row * S[1, 1]``, ``z = 0`` with pixels counted from 1; the local transform of frame i is
``T_{i-1<-i}`` (frame i's image mm -> frame i-1's image mm); parameters ``[a_Z, a_Y, a_X, t_x, t_y,
t_z]`` with ``R = Rz(a_Z) Ry(a_Y) Rx(a_X)`` (radians, mm), built with
``utils.transform.params_to_matrix``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from utils import transform as tf
from utils.atomic import atomic_path
from utils.errors import InputError
from utils.moves import MOVE_SPEED_DEG, move_segments

SIGN_ZERO = "zero"
SIGN_CONTINUITY = "continuity"
SIGN_MOVES = "moves"
SIGN_RULES = (SIGN_ZERO, SIGN_CONTINUITY, SIGN_MOVES)
MOVE_KINDS = ("tilt", "twist")  # the ``moves`` rule's kinds of move, in the order of ``move_signs``
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

CALIBRATION_FORMAT_VERSION = 1
CALIBRATION_FILE = "speckle_calibration.json"

# Grey level at or below which a pixel counts as black (outside the sector, or a full shadow): the
# scan conversion writes exact zeros there, and log compression maps the noise floor to a few grey
# levels at most.
BLACK_LEVEL = 4
# Tukey biweight cut-off in robust standard deviations of the residuals (the usual 95 % efficiency
# constant), and the floor of that deviation in pixels: sub-pixel peaks are good to ~0.05 px, so a
# fit whose residuals are all smaller than this needs no re-weighting.
TUKEY_C = 4.685
MIN_RESIDUAL_SCALE_PX = 0.1
# Correlations are clipped at max(rho_min, RHO_CLIP_LOW) before the curve is inverted (log 0 is -inf),
# and at rho0 from above (no measurable displacement).
RHO_CLIP_LOW = 1e-3


# --------------------------------------------------------------------------------------------
# Settings and calibration
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SpeckleSettings:
    """How patches are placed and matched (pixels of the full-resolution frames).

    Attributes:
        patch_px: side of the square patches (pixels), capped at a fifth of the smaller image side
            so small frames still get a grid (``resolved``).
        stride_px: distance between patch corners on the grid; None = half the patch: patches
            overlap by half, four times as many as a tiling (and four times its cost), which the
            out-of-plane fit needs to tell a fan (tilt about the lateral axis) from a twist.
        margin_px: search range, the largest displacement (pixels, each axis) found between two
            consecutive frames; None = a quarter of the patch (12 px for 48 px patches). The
            simulated rotation scans move at most ~3.3 px per frame in-plane at 480x640 (20 fps).
        min_signal: the fraction of a patch's pixels above ``BLACK_LEVEL``, in both frames, for the
            patch to be used for that pair.
        rho_min: correlations at or below this carry no weight in the in-plane fit and are the
            floor of the decorrelation curve (the NCC peak of unrelated 48x48 patches of synthetic
            speckle over a 25x25 search: 0.12 on average, at most 0.18, measured).
        robust_iterations: re-weighting passes of the in-plane fit after the first.
        pairs_per_chunk: pairs matched at once (bounds the memory: ~``pairs_per_chunk`` x patches x
            (patch + 2 margin)^2 complex values).
    """

    patch_px: int = 48
    stride_px: int | None = None
    margin_px: int | None = None
    min_signal: float = 0.9
    rho_min: float = 0.2
    robust_iterations: int = 3
    pairs_per_chunk: int = 16

    def __post_init__(self):
        for name in ("patch_px", "pairs_per_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 4:
                raise InputError(f"{name}={value!r}: expected an integer >= 4")
        for name in ("stride_px", "margin_px"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InputError(f"{name}={value!r}: expected a positive integer or None (automatic)")
        if not 0.0 < self.min_signal <= 1.0:
            raise InputError(f"min_signal={self.min_signal!r}: expected a fraction in (0, 1]")
        if not 0.0 <= self.rho_min < 1.0:
            raise InputError(f"rho_min={self.rho_min!r}: expected a correlation in [0, 1)")
        if isinstance(self.robust_iterations, bool) or not isinstance(self.robust_iterations, int) \
                or self.robust_iterations < 0:
            raise InputError(f"robust_iterations={self.robust_iterations!r}: expected an integer >= 0")

    def resolved(self, height: int, width: int) -> tuple[int, int, int]:
        """``(patch, stride, margin)`` in pixels for frames of ``height`` x ``width``."""
        patch = min(self.patch_px, max(8, min(height, width) // 5))
        stride = max(1, patch // 2) if self.stride_px is None else self.stride_px
        margin = max(2, patch // 4) if self.margin_px is None else self.margin_px
        return patch, stride, margin


# --------------------------------------------------------------------------------------------
# Patch grid and matching
# --------------------------------------------------------------------------------------------


def patch_grid(height: int, width: int, patch: int, stride: int, margin: int) -> torch.Tensor:
    """Top-left corners of a regular grid of patches whose search windows lie inside the image.

    Returns:
        long [K, 2], ``(row, column)`` 0-based array indices of each patch's first pixel; the grid
        is centred in the image and every patch satisfies ``margin <= row``,
        ``row + patch + margin <= height`` (columns likewise). K = 0 when the image is too small.
    """
    axes = []
    for size in (height, width):
        room = size - 2 * margin - patch  # free space for the corner positions
        if room < 0:
            return torch.zeros(0, 2, dtype=torch.long)
        count = room // stride + 1
        first = margin + (room - (count - 1) * stride) // 2
        axes.append(first + stride * torch.arange(count))
    rows, cols = torch.meshgrid(axes[0], axes[1], indexing="ij")
    return torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1)


def patch_centres_px(corners: torch.Tensor, patch: int) -> torch.Tensor:
    """Patch centres in pixel coordinates (x = column, y = row, counted from 1), float64 [K, 2]."""
    # A patch covering 0-based indices c .. c + patch - 1 is centred on index c + (patch - 1) / 2,
    # which is pixel c + (patch + 1) / 2 when pixels count from 1.
    centre = corners.to(torch.float64) + (patch + 1) / 2
    return centre[:, [1, 0]]


def _box_sums(image: torch.Tensor, size: int) -> torch.Tensor:
    """Sums of ``size`` x ``size`` windows at every valid offset: [..., L, L] -> [..., L-size+1, L-size+1].

    Separable running sums: along columns first, then along rows of the (narrower) result.
    """
    running = image.cumsum(dim=-1)
    rows = running[..., size - 1:].clone()
    rows[..., 1:] -= running[..., :-size]
    running = rows.cumsum(dim=-2)
    sums = running[..., size - 1:, :].clone()
    sums[..., 1:, :] -= running[..., :-size, :]
    return sums


def signal_fractions(frames: torch.Tensor, corners: torch.Tensor, patch: int, stride: int) -> torch.Tensor:
    """Fraction of each patch's pixels brighter than ``BLACK_LEVEL``: float32 [B, K] from uint8 [B, H, W].

    ``corners`` must be a ``patch_grid`` (or a subset of one) with this ``stride``: the fractions of
    the whole grid come from one average pooling.
    """
    if len(corners) == 0:
        return torch.zeros(len(frames), 0)
    first = corners.min(dim=0).values
    bright = (frames[:, None, first[0]:, first[1]:] > BLACK_LEVEL).to(torch.float32)
    pooled = torch.nn.functional.avg_pool2d(bright, kernel_size=patch, stride=stride)[:, 0]
    index = (corners - first) // stride
    return pooled[:, index[:, 0], index[:, 1]]


def _gather(frames: torch.Tensor, corners: torch.Tensor, size: int, offset: int, stride: int) -> torch.Tensor:
    """Squares of ``size`` pixels starting ``offset`` before each corner: [B, H, W] -> [B, K, size, size].

    ``corners`` lie on a grid of spacing ``stride`` (``patch_grid``): the squares are a strided view
    of the frames (``unfold``), of which only the K wanted ones are copied.
    """
    first = corners.min(dim=0).values
    view = frames[:, first[0] - offset:, first[1] - offset:].unfold(1, size, stride).unfold(2, size, stride)
    index = (corners - first) // stride
    return view[:, index[:, 0], index[:, 1]]


def match_patches(moving: torch.Tensor, reference: torch.Tensor, corners: torch.Tensor, patch: int,
                  margin: int, stride: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Find each patch of ``moving`` in ``reference`` by normalised cross-correlation.

    Args:
        moving: [B, H, W] frames i (any real dtype; float32 used), the patches are cut from them.
        reference: [B, H, W] frames i-1, searched within ``margin`` pixels of each patch's place.
        corners: long [K, 2] top-left corners from ``patch_grid`` (search windows inside the image).
        patch, margin, stride: patch side, search range and the grid's spacing, pixels.
    Returns:
        ``(shift, peak, inside)``: ``shift`` float64 [B, K, 2] pixels ``(dx, dy)`` (column, row) such
        that the patch of frame i at pixel p is found in frame i-1 at ``p + shift``, sub-pixel;
        ``peak`` float64 [B, K] the NCC at the (interpolated) peak, in [-1, 1]; ``inside`` bool
        [B, K], False where the integer peak lies on the edge of the search range (the true peak may
        be outside it, and no parabola fits there).
    """
    size = patch + 2 * margin
    span = 2 * margin + 1
    template = _gather(moving, corners, patch, 0, stride).to(torch.float32)
    search = _gather(reference, corners, size, margin, stride).to(torch.float32)
    template -= template.mean(dim=(-2, -1), keepdim=True)
    # Subtracting the window's mean changes no NCC (the template is zero-mean) but keeps the float32
    # FFT and the running sums of the variances well conditioned (relative errors ~1e-6).
    search -= search.mean(dim=(-2, -1), keepdim=True)
    spectrum = torch.fft.rfft2(search) * torch.fft.rfft2(template, s=(size, size)).conj()
    # Circular correlation; offsets 0..2 margin never wrap because the template is zero-padded.
    numerator = torch.fft.irfft2(spectrum, s=(size, size))[..., :span, :span]
    window_sum = _box_sums(search, patch)
    window_var = (_box_sums(search.square_(), patch) - window_sum.square() / float(patch * patch)).clamp_min_(0)
    template_norm = template.square().sum(dim=(-2, -1))[..., None, None].sqrt()
    denominator = template_norm * window_var.sqrt()
    # Flat patches (zero variance) have no correlation; a floor keeps the division finite.
    ncc = torch.where(denominator > 1e-3, numerator / denominator.clamp_min(1e-3), 0.0)

    flat = ncc.flatten(-2)
    best = flat.argmax(dim=-1)
    row, col = best // span, best % span
    inside = (row > 0) & (row < span - 1) & (col > 0) & (col < span - 1)
    row_c, col_c = row.clamp(1, span - 2), col.clamp(1, span - 2)

    def at(dr, dc):  # the NCC next to the peak, in float64 for the parabola
        return flat.gather(-1, ((row_c + dr) * span + (col_c + dc))[..., None])[..., 0].to(torch.float64)

    centre = at(0, 0)
    offsets, peak = [], centre
    for minus, plus in ((at(-1, 0), at(1, 0)), (at(0, -1), at(0, 1))):
        curvature = minus - 2 * centre + plus
        # A parabola through three samples around a true maximum has negative curvature; anything
        # else (a plateau) keeps the integer position.
        delta = torch.where(curvature < -1e-12, 0.5 * (minus - plus) / curvature.clamp_max(-1e-12),
                            torch.zeros_like(centre)).clamp(-0.5, 0.5)
        offsets.append(delta)
        peak = peak - 0.25 * (minus - plus) * delta
    delta_row = torch.where(inside, offsets[0], torch.zeros_like(centre))
    delta_col = torch.where(inside, offsets[1], torch.zeros_like(centre))
    peak = torch.where(inside, peak.clamp(-1, 1), flat.gather(-1, best[..., None])[..., 0].to(torch.float64))
    shift_rows = row.to(torch.float64) - margin + delta_row
    shift_cols = col.to(torch.float64) - margin + delta_col
    return torch.stack([shift_cols, shift_rows], dim=-1), peak, inside


# --------------------------------------------------------------------------------------------
# In-plane rigid fit
# --------------------------------------------------------------------------------------------


def fit_rigid_2d(source: torch.Tensor, target: torch.Tensor,
                 weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted least-squares 2-D rigid transform moving ``source`` onto ``target``.

    Args:
        source, target: float64 [B, K, 2] point pairs (mm).
        weights: float64 [B, K] >= 0; a batch row whose weights sum to 0 gets the identity.
    Returns:
        ``(angle [B], translation [B, 2])`` with ``target ~ R(angle) source + translation``,
        ``R(a) = [[cos a, -sin a], [sin a, cos a]]`` (closed form: the angle of the weighted
        cross-covariance of the centred points).
    """
    total = weights.sum(dim=-1, keepdim=True)
    safe = total.clamp_min(1e-300)
    mean_source = (weights[..., None] * source).sum(dim=-2) / safe
    mean_target = (weights[..., None] * target).sum(dim=-2) / safe
    a = source - mean_source[..., None, :]
    b = target - mean_target[..., None, :]
    cross = (weights * (a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0])).sum(dim=-1)
    dot = (weights * (a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1])).sum(dim=-1)
    angle = torch.atan2(cross, dot)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotated = torch.stack([cos * mean_source[..., 0] - sin * mean_source[..., 1],
                           sin * mean_source[..., 0] + cos * mean_source[..., 1]], dim=-1)
    translation = mean_target - rotated
    empty = total[..., 0] <= 0
    angle = torch.where(empty, torch.zeros_like(angle), angle)
    translation = torch.where(empty[..., None], torch.zeros_like(translation), translation)
    return angle, translation


def _rotate(angle: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    cos, sin = torch.cos(angle)[..., None], torch.sin(angle)[..., None]
    return torch.stack([cos * points[..., 0] - sin * points[..., 1], sin * points[..., 0] + cos * points[..., 1]], -1)


def robust_rigid_2d(source: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, iterations: int,
                    min_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fit_rigid_2d`` re-weighted ``iterations`` times with Tukey's biweight on the residuals.

    The residual scale of each pair is 1.4826 x the median residual of its weighted patches (a
    robust standard deviation), at least ``min_scale`` (mm); a patch further than ``TUKEY_C`` scales
    from the fit gets weight 0. Returns ``(angle [B], translation [B, 2], final weights [B, K])``.
    """
    angle, translation = fit_rigid_2d(source, target, weights)
    current = weights
    if source.shape[-2] == 0:  # no patch at all: the identity, and no residual to re-weight by
        return angle, translation, current
    for _ in range(iterations):
        residual = (_rotate(angle, source) + translation[..., None, :] - target).norm(dim=-1)
        used = weights > 0
        median = torch.where(used, residual, torch.full_like(residual, math.nan)).nanmedian(dim=-1).values
        scale = (1.4826 * torch.nan_to_num(median, nan=0.0)).clamp_min(min_scale)
        ratio = residual / (TUKEY_C * scale[..., None])
        current = weights * (1 - ratio.square()).clamp_min(0).square()
        angle, translation = fit_rigid_2d(source, target, current)
    return angle, translation, current


# --------------------------------------------------------------------------------------------
# Measuring a scan's consecutive pairs
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)  # eq would compare tensors elementwise
class PairMeasurements:
    """Patch matches of pairs of consecutive frames ``(i-1, i)`` of one scan.

    Attributes:
        frames: long [M], the moving frame i of each pair (1..N-1).
        centres_mm: float64 [K, 2], patch centres in image mm ``(x, y)`` (frame i).
        shift_mm: float64 [M, K, 2], where each patch centre of frame i was found in frame i-1,
            minus the centre (image mm).
        peak: float64 [M, K], NCC at the peak.
        usable: bool [M, K], the patch has signal in both frames and its peak is inside the search
            range; the other entries of ``shift_mm`` and ``peak`` mean nothing.
        pixel_size_mm: ``(S[0, 0], S[1, 1])``.
        image_size: ``(H, W)`` of the frames (pixels); None: not known.
    """

    frames: torch.Tensor
    centres_mm: torch.Tensor
    shift_mm: torch.Tensor
    peak: torch.Tensor
    usable: torch.Tensor
    pixel_size_mm: tuple[float, float]
    image_size: tuple[int, int] | None = None


def _as_frames(frames) -> torch.Tensor:
    if isinstance(frames, torch.Tensor):
        tensor = frames.cpu()
    else:
        array = np.asarray(frames)
        if not array.flags.writeable:
            array = array.copy()  # torch.from_numpy refuses (warns about) read-only memory
        tensor = torch.from_numpy(array)
    if tensor.ndim != 3 or tensor.dtype != torch.uint8:
        raise InputError(f"frames must be uint8 [N, H, W]; got {tensor.dtype} {tuple(tensor.shape)}")
    return tensor


def _pixel_size(scale) -> tuple[float, float]:
    scale = np.asarray(scale, dtype=np.float64)
    if scale.shape != (4, 4) or not np.all(np.isfinite(scale)):
        raise InputError(f"scale must be the finite [4, 4] pixel -> mm matrix S; got shape {scale.shape}")
    sx, sy = float(scale[0, 0]), float(scale[1, 1])
    if not (sx > 0 and sy > 0):
        raise InputError(f"scale S has pixel sizes ({sx}, {sy}) mm; expected positive values on its diagonal")
    return sx, sy


def measure_pairs(frames, scale, settings: SpeckleSettings | None = None, moving=None) -> PairMeasurements:
    """Match the patch grid of every frame i in ``moving`` with frame i-1.

    Args:
        frames: uint8 [N, H, W] (numpy or torch), the whole scan at full resolution.
        scale: [4, 4] ``S`` (pixel -> image mm; only the diagonal's pixel sizes are used).
        settings: patch size, grid and search range (default ``SpeckleSettings()``).
        moving: frames i to measure (ints in 1..N-1); None = all, 1..N-1.
    Returns:
        ``PairMeasurements``. Patches that never have signal in the scan are left out of the grid.
    """
    settings = settings or SpeckleSettings()
    frames = _as_frames(frames)
    num_frames, height, width = frames.shape
    sx, sy = _pixel_size(scale)
    patch, stride, margin = settings.resolved(height, width)
    moving = torch.arange(1, num_frames) if moving is None else torch.as_tensor(moving, dtype=torch.long).reshape(-1)
    if len(moving) and (int(moving.min()) < 1 or int(moving.max()) > num_frames - 1):
        raise InputError(f"moving frames must be in 1..{num_frames - 1}; got {moving.min()}..{moving.max()}")
    corners = patch_grid(height, width, patch, stride, margin)

    # Signal per frame and patch, chunked (an int32 integral image of the whole scan would be 4 N H W bytes).
    signal = torch.cat([signal_fractions(frames[start:start + 64], corners, patch, stride)
                        for start in range(0, num_frames, 64)])
    has_signal = signal >= settings.min_signal
    keep = has_signal.any(dim=0)
    corners, has_signal = corners[keep], has_signal[:, keep]
    count = len(corners)
    centres = patch_centres_px(corners, patch) * torch.tensor([sx, sy], dtype=torch.float64)

    shift = torch.zeros(len(moving), count, 2, dtype=torch.float64)
    peak = torch.zeros(len(moving), count, dtype=torch.float64)
    usable = torch.zeros(len(moving), count, dtype=torch.bool)
    if count:
        for start in range(0, len(moving), settings.pairs_per_chunk):
            index = moving[start:start + settings.pairs_per_chunk]
            pair_shift, pair_peak, inside = match_patches(frames[index], frames[index - 1], corners, patch, margin,
                                                          stride)
            stop = start + len(index)
            shift[start:stop] = pair_shift * torch.tensor([sx, sy], dtype=torch.float64)
            peak[start:stop] = pair_peak
            usable[start:stop] = inside & has_signal[index] & has_signal[index - 1]
    return PairMeasurements(moving, centres, shift, peak, usable, (sx, sy), (height, width))


# --------------------------------------------------------------------------------------------
# The decorrelation curve and its calibration
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SpeckleCalibration:
    """The calibrated speckle decorrelation curve, JSON-able (``to_dict`` / ``from_dict``, ``save`` / ``load``).

    The peak NCC of a patch at depth y whose centre moved d mm out of the image plane is modelled as
    ``rho0[b] exp(-d^2 / (2 sigma_mm[b]^2))`` with b the depth band holding y.

    Attributes:
        band_edges_mm: B + 1 ascending depth band edges, image y mm (``row * S[1, 1]``); depths
            outside the first or last band use that band.
        sigma_mm: B decorrelation lengths (mm), one per band.
        rho0: B correlations at zero displacement, in (0, 1].
        pixel_size_mm: ``(S[0, 0], S[1, 1])`` of the frames it was made for; the curve depends on
            the pixel size and patch size through the NCC, so other images are refused.
        settings: the ``SpeckleSettings`` the curve was measured with (prediction uses them).
        stop_threshold_mm: the ``continuity`` rule's stop level of the out-of-plane magnitude (RMS
            elevational displacement over the patches, mm).
        initial_sign: +1 or -1, the ``continuity`` rule's direction for the first moving segment,
            relative to the canonical one (positive mean elevational displacement of the patches):
            the majority on the training scans.
        turn_pairs: the ``moves`` rule's shortest turn: shorter stops are ignored (1: none is).
        min_run_pairs: the ``moves`` rule's shortest run of moving pairs: shorter ones are ignored.
        rock_deg: the ``moves`` rule's in-plane turning per pair (degrees) above which a pair counts
            as stopped (0: none does).
        pause_pairs: the ``moves`` rule's pause: a stop of at least this many pairs ends a move
            (0: not calibrated, the rule is refused).
        move_signs: the ``moves`` rule's direction of a move's start, per kind (``MOVE_KINDS``), +1
            or -1 relative to ``move_directions``' canonical one: the majority on the training scans.
        quarter_turn_deg: the ``moves`` rule's size of the protocol's quarter turn (degrees; 0: none
            found in the training scans, twists are left as measured; ``sized_quarter_turns``).
        samples: B, patches that calibrated each band; num_pairs: pairs used in all.
        source: free text, where the calibration comes from.
    """

    band_edges_mm: tuple[float, ...]
    sigma_mm: tuple[float, ...]
    rho0: tuple[float, ...]
    pixel_size_mm: tuple[float, float]
    settings: SpeckleSettings = SpeckleSettings()
    stop_threshold_mm: float = 0.0
    initial_sign: int = 1
    turn_pairs: int = 1
    min_run_pairs: int = 1
    rock_deg: float = 0.0
    pause_pairs: int = 0
    move_signs: tuple[int, int] = (1, 1)
    quarter_turn_deg: float = 0.0
    samples: tuple[int, ...] = ()
    num_pairs: int = 0
    source: str = ""
    # Named in the validation errors (the file a calibration was read from); not a field of the record.
    _where: dataclasses.InitVar[str] = "SpeckleCalibration"

    def __post_init__(self, _where: str):
        self.validate(_where)

    def validate(self, where: str) -> None:
        """Raise ValueError naming ``where`` and the bad field unless every field is consistent."""
        edges = np.asarray(self.band_edges_mm, dtype=np.float64)
        bands = len(edges) - 1
        if edges.ndim != 1 or bands < 1 or not np.all(np.isfinite(edges)) or not np.all(np.diff(edges) > 0):
            raise InputError(f"{where}: 'band_edges_mm' must be at least 2 finite ascending depths (mm), "
                             f"got {list(self.band_edges_mm)}")
        for name, low, high in (("sigma_mm", 0.0, math.inf), ("rho0", 0.0, 1.0)):
            values = np.asarray(getattr(self, name), dtype=np.float64)
            if values.shape != (bands,) or not np.all(np.isfinite(values)) or not np.all(values > low) \
                    or not np.all(values <= high):
                raise InputError(f"{where}: {name!r} must hold {bands} values (one per depth band) in "
                                 f"({low}, {high}], got {list(getattr(self, name))}")
        pixel = np.asarray(self.pixel_size_mm, dtype=np.float64)
        if pixel.shape != (2,) or not np.all(np.isfinite(pixel)) or not np.all(pixel > 0):
            raise InputError(f"{where}: 'pixel_size_mm' must be two positive sizes (S[0,0], S[1,1]) in mm, "
                             f"got {self.pixel_size_mm!r}")
        if not isinstance(self.settings, SpeckleSettings):
            raise InputError(f"{where}: 'settings' must be SpeckleSettings, got {type(self.settings).__name__}")
        if not (math.isfinite(self.stop_threshold_mm) and self.stop_threshold_mm >= 0):
            raise InputError(f"{where}: 'stop_threshold_mm' must be a finite number >= 0, "
                             f"got {self.stop_threshold_mm!r}")
        if self.initial_sign not in (1, -1) or isinstance(self.initial_sign, bool):
            raise InputError(f"{where}: 'initial_sign' must be 1 or -1, got {self.initial_sign!r}")
        for name, low in (("turn_pairs", 1), ("min_run_pairs", 1), ("pause_pairs", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"{where}: {name!r} must be a whole number of pairs >= {low}, got {value!r}")
        if not (isinstance(self.rock_deg, (int, float)) and not isinstance(self.rock_deg, bool)
                and math.isfinite(self.rock_deg) and self.rock_deg >= 0):
            raise InputError(f"{where}: 'rock_deg' must be a finite number of degrees >= 0, got {self.rock_deg!r}")
        if not (math.isfinite(self.quarter_turn_deg) and 0 <= self.quarter_turn_deg <= 180):
            raise InputError(f"{where}: 'quarter_turn_deg' must be a finite number of degrees in 0..180, "
                             f"got {self.quarter_turn_deg!r}")
        if self.pause_pairs and self.pause_pairs <= self.turn_pairs:
            raise InputError(f"{where}: 'pause_pairs' ({self.pause_pairs}) must exceed 'turn_pairs' ({self.turn_pairs})")
        if len(self.move_signs) != len(MOVE_KINDS) or any(isinstance(v, bool) or v not in (1, -1)
                                                          for v in self.move_signs):
            raise InputError(f"{where}: 'move_signs' must be {len(MOVE_KINDS)} values of 1 or -1 (one per kind "
                             f"{list(MOVE_KINDS)}), got {list(self.move_signs)}")
        if self.samples and len(self.samples) != bands:
            raise InputError(f"{where}: 'samples' must hold {bands} counts (one per depth band), "
                             f"got {list(self.samples)}")

    def band_of(self, depth_mm: torch.Tensor) -> torch.Tensor:
        """Band index (long, same shape) of depths in image y mm; outside depths get the nearest band."""
        edges = torch.as_tensor(self.band_edges_mm, dtype=torch.float64)
        return torch.bucketize(depth_mm.to(torch.float64), edges[1:-1], right=True)

    def displacement_squared(self, peak: torch.Tensor, depth_mm: torch.Tensor) -> torch.Tensor:
        """The curve inverted: ``d^2 = 2 sigma^2 ln(rho0 / rho)`` (mm^2), 0 where ``rho >= rho0``.

        Correlations below ``settings.rho_min`` are clipped to it: an NCC peak that low is what
        unrelated patches give, so it only says ``d >= sigma sqrt(2 ln(rho0 / rho_min))``.
        """
        band = self.band_of(depth_mm)
        sigma = torch.as_tensor(self.sigma_mm, dtype=torch.float64)[band]
        rho0 = torch.as_tensor(self.rho0, dtype=torch.float64)[band]
        low = max(self.settings.rho_min, RHO_CLIP_LOW)
        rho = torch.minimum(peak.to(torch.float64).clamp_min(low), rho0)
        return 2 * sigma.square() * torch.log(rho0 / rho)

    def to_dict(self) -> dict:
        """A plain JSON-able dict (``format_version`` first)."""
        record = {"format_version": CALIBRATION_FORMAT_VERSION}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            record[field.name] = dataclasses.asdict(value) if field.name == "settings" else \
                list(value) if isinstance(value, tuple) else value
        return record

    @classmethod
    def from_dict(cls, record, source: str = "speckle calibration") -> SpeckleCalibration:
        """Rebuild from ``to_dict``'s output; ValueError naming ``source`` and the field otherwise."""
        if not isinstance(record, dict):
            raise InputError(f"{source}: expected a JSON object, got {type(record).__name__}")
        version = record.get("format_version")
        if version != CALIBRATION_FORMAT_VERSION:
            raise InputError(f"{source}: 'format_version' is {version!r}; this code reads version "
                             f"{CALIBRATION_FORMAT_VERSION}")
        names = {field.name for field in dataclasses.fields(cls)}
        required = {"band_edges_mm", "sigma_mm", "rho0", "pixel_size_mm"}
        missing = sorted(required - set(record))
        unknown = sorted(set(record) - names - {"format_version"})
        if missing or unknown:
            raise InputError(f"{source}: missing field(s) {missing}, unknown field(s) {unknown}; expected "
                             f"{sorted(names)} and 'format_version'")
        values = {}
        try:
            for name in ("band_edges_mm", "sigma_mm", "rho0", "pixel_size_mm"):
                values[name] = tuple(float(v) for v in record[name])
            if "samples" in record:
                values["samples"] = tuple(int(v) for v in record["samples"])
            for name, kind in (("stop_threshold_mm", float), ("rock_deg", float), ("quarter_turn_deg", float),
                               ("num_pairs", int), ("source", str)):
                if name in record:
                    values[name] = kind(record[name])
        except (TypeError, ValueError) as error:
            raise InputError(f"{source}: a field has the wrong type ({error}); expected lists of numbers for "
                             "band_edges_mm, sigma_mm, rho0, pixel_size_mm") from None
        for name in ("initial_sign", "turn_pairs", "min_run_pairs", "pause_pairs"):  # checked by validate (a float is refused)
            if name in record:
                values[name] = record[name]
        if "move_signs" in record:
            if not isinstance(record["move_signs"], list):
                raise InputError(f"{source}: 'move_signs' must be a list of {len(MOVE_KINDS)} values of 1 or -1, "
                                 f"got {record['move_signs']!r}")
            values["move_signs"] = tuple(record["move_signs"])
        if "settings" in record:
            settings = record["settings"]
            known = {field.name for field in dataclasses.fields(SpeckleSettings)}
            if not isinstance(settings, dict) or set(settings) - known:
                raise InputError(f"{source}: 'settings' must be an object with some of {sorted(known)}, "
                                 f"got {settings!r}")
            try:
                values["settings"] = SpeckleSettings(**settings)
            except (TypeError, ValueError) as error:
                raise InputError(f"{source}: 'settings': {error}") from None
        try:
            return cls(**values, _where=source)
        except TypeError as error:  # e.g. an initial_sign that is not a number
            raise InputError(f"{source}: {error}") from None

    def save(self, path) -> Path:
        """Write ``to_dict`` as JSON (atomically); returns ``path``."""
        path = Path(path)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path) -> SpeckleCalibration:
        """Read a calibration written by ``save``; FileNotFoundError / ValueError naming the file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"speckle calibration file not found: {path}")
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise InputError(f"{path}: not a valid JSON speckle calibration ({error})") from None
        return cls.from_dict(record, source=str(path))

    def check_rule(self, rule: str) -> None:
        """Raise ValueError unless ``rule`` is a sign rule this calibration can drive."""
        if rule not in SIGN_RULES:
            raise InputError(f"sign rule {rule!r} is not one of {list(SIGN_RULES)}")
        if rule == SIGN_MOVES and self.pause_pairs < 1:
            raise InputError(f"{self.source or 'this speckle calibration'}: no 'pause_pairs' for the {SIGN_MOVES!r} "
                             "sign rule (made before the rule existed): calibrate again on the training data")

    def check_pixel_size(self, scale, tolerance: float = 1e-3) -> None:
        """Raise ValueError unless ``scale``'s pixel size is the calibration's (relative ``tolerance``)."""
        sx, sy = _pixel_size(scale)
        cx, cy = self.pixel_size_mm
        if abs(sx - cx) > tolerance * cx or abs(sy - cy) > tolerance * cy:
            raise InputError(f"the speckle calibration was made for pixels of {cx:.6g} x {cy:.6g} mm, these frames "
                             f"have {sx:.6g} x {sy:.6g} mm (S); calibrate on training data of this pixel size")


def fit_decorrelation_curve(peak, displacement_mm) -> tuple[float, float]:
    """Least-squares ``(sigma, rho0)`` of ``peak ~ rho0 exp(-d^2 / (2 sigma^2))`` for one depth band.

    Args:
        peak: [P] peak correlations; displacement_mm: [P] true elevational displacements (any sign).
    Returns:
        ``(sigma_mm, rho0)``: for a given sigma the best rho0 is linear (a projection), so sigma is
        found on a log grid from 0.02 to 50 mm and refined by golden-section search around the best
        grid point; rho0 is then clipped into (0, 1].
    Raises:
        ValueError: fewer than 3 finite samples, or no spread in the displacements.
    """
    rho = torch.as_tensor(np.asarray(peak), dtype=torch.float64).reshape(-1)
    d2 = torch.as_tensor(np.asarray(displacement_mm), dtype=torch.float64).reshape(-1).square()
    finite = torch.isfinite(rho) & torch.isfinite(d2)
    rho, d2 = rho[finite], d2[finite]
    if len(rho) < 3 or float(d2.max() - d2.min()) <= 0:
        raise InputError(f"cannot fit a decorrelation curve to {len(rho)} samples without spread in the displacement")

    def residual(log_sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        curve = torch.exp(-d2[None] / (2 * torch.exp(2 * log_sigma)[:, None]))
        rho0 = ((curve * rho[None]).sum(-1) / curve.square().sum(-1).clamp_min(1e-300)).clamp(1e-6, 1.0)
        return (rho[None] - rho0[:, None] * curve).square().sum(-1), rho0

    grid = torch.linspace(math.log(0.02), math.log(50.0), 200, dtype=torch.float64)
    costs, _ = residual(grid)
    best = int(costs.argmin())
    low, high = grid[max(best - 1, 0)].item(), grid[min(best + 1, len(grid) - 1)].item()
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(40):  # golden section: the bracket shrinks to 0.618^40 of a grid step
        a, b = high - ratio * (high - low), low + ratio * (high - low)
        cost_a, cost_b = residual(torch.tensor([a, b], dtype=torch.float64))[0]
        if cost_a <= cost_b:
            high = b
        else:
            low = a
    log_sigma = torch.tensor([(low + high) / 2], dtype=torch.float64)
    _, rho0 = residual(log_sigma)
    return float(torch.exp(log_sigma)), float(rho0)


def fit_depth_bands(peak, displacement_mm, depth_mm, band_mm: float = 10.0,
                    min_samples: int = 100) -> tuple[list[float], list[float], list[float], list[int]]:
    """Fit ``fit_decorrelation_curve`` per depth band.

    Bands of ``band_mm`` tile the depths seen; a band with fewer than ``min_samples`` samples is
    merged into its shallower neighbour (the first into its deeper one), so every band is fitted
    on enough patches.

    Args:
        peak, displacement_mm, depth_mm: [P] per patch and pair: peak NCC, true elevational
            displacement (mm) and depth (image y, mm).
    Returns:
        ``(edges [B+1], sigma [B], rho0 [B], samples [B])``.
    """
    peak = np.asarray(peak, dtype=np.float64).reshape(-1)
    displacement = np.asarray(displacement_mm, dtype=np.float64).reshape(-1)
    depth = np.asarray(depth_mm, dtype=np.float64).reshape(-1)
    if not peak.shape == displacement.shape == depth.shape:
        raise InputError(f"peak, displacement and depth must have the same length; got {peak.shape}, "
                         f"{displacement.shape}, {depth.shape}")
    if len(depth) < max(min_samples, 3):
        raise InputError(f"{len(depth)} patch samples are too few to calibrate the decorrelation curve "
                         f"(need {max(min_samples, 3)}); calibrate on more training pairs")
    low = math.floor(depth.min() / band_mm) * band_mm
    high = max(math.ceil(depth.max() / band_mm) * band_mm, low + band_mm)
    edges = list(np.arange(low, high + band_mm / 2, band_mm))
    while True:
        counts = np.histogram(depth, bins=edges)[0]
        small = np.flatnonzero(counts < min_samples)
        if len(edges) == 2 or not len(small):
            break
        k = int(small[0])
        del edges[k if k > 0 else 1]  # drop the edge shared with the shallower band (the deeper one for band 0)
    sigmas, rho0s = [], []
    for k in range(len(edges) - 1):
        inside = (depth >= edges[k]) & ((depth < edges[k + 1]) | (k == len(edges) - 2))
        sigma, rho0 = fit_decorrelation_curve(peak[inside], displacement[inside])
        sigmas.append(sigma)
        rho0s.append(rho0)
    return [float(e) for e in edges], sigmas, rho0s, [int(c) for c in counts]


# --------------------------------------------------------------------------------------------
# Motion of each pair
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class MotionEstimate:
    """Per-pair motion from ``PairMeasurements`` before the out-of-plane sign is chosen.

    Attributes:
        angle: float64 [M], in-plane rotation a_Z (radians) of ``T_{i-1<-i}``.
        translation: float64 [M, 2], in-plane translation (t_x, t_y), mm.
        plane: float64 [M, 3], the elevational displacement field ``d(x, y) = p0 + p1 x + p2 y``
            (mm, x and y in image mm) in its canonical orientation: positive at the centroid of the
            scan's patch grid. The true field is ``+plane`` or ``-plane``.
        magnitude: float64 [M], RMS of ``d`` over the scan's patch grid (mm).
        gram: float64 [3, 3], ``sum_k u_k u_k^T`` over the grid's centres ``u = (1, x, y)``: the inner
            product of two fields over the grid is ``p^T gram q`` (the sign rules compare fields).
        kind_gram: float64 [3, 3], the same over a 3 x 3 lattice spanning the whole image
            (``image_gram``): the kind of a move (``move_directions``) is judged over it, since a twist
            turns about the probe's axis, the image's lateral middle, wherever the patches with signal
            lie (where they all lie to one side of it, over the grid a twist looks like a tilt); None:
            ``gram``.
    """

    angle: torch.Tensor
    translation: torch.Tensor
    plane: torch.Tensor
    magnitude: torch.Tensor
    gram: torch.Tensor
    kind_gram: torch.Tensor | None = None


def _kind_gram(estimate: MotionEstimate) -> torch.Tensor:
    """The inner product over which ``estimate``'s moves are told apart (``MotionEstimate.kind_gram``)."""
    return estimate.gram if estimate.kind_gram is None else estimate.kind_gram


def _rank_one_plane(u: torch.Tensor, d2: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The plane q with ``(q . u)^2 ~ d2`` (weighted least squares of the quadratic form, then rank 1).

    Args:
        u: [K, 3] ``(1, x, y)`` in well-scaled coordinates; d2: [M, K] squared displacements;
        weights: [M, K] >= 0.
    Returns:
        [M, 3] q, the leading eigenvector of the fitted symmetric M scaled by the square root of its
        eigenvalue (zero where that eigenvalue is not positive or fewer than 6 patches count),
        oriented so that q[0] >= 0.
    """
    x, y = u[:, 1], u[:, 2]
    features = torch.stack([torch.ones_like(x), 2 * x, 2 * y, x * x, 2 * x * y, y * y], dim=-1)  # [K, 6]
    weighted = weights[..., None] * features  # [M, K, 6]
    normal = weighted.transpose(-1, -2) @ features  # [M, 6, 6]
    rhs = (weighted * d2[..., None]).sum(dim=-2)  # [M, 6]
    # A relative ridge keeps pairs with few patches solvable; their result is dropped below anyway.
    ridge = 1e-9 * normal.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-30)
    normal = normal + ridge[:, None, None] * torch.eye(6, dtype=normal.dtype)
    coef = torch.linalg.solve(normal, rhs[..., None])[..., 0]
    m00, m01, m02, m11, m12, m22 = coef.unbind(-1)
    matrix = torch.stack([torch.stack([m00, m01, m02], -1), torch.stack([m01, m11, m12], -1),
                          torch.stack([m02, m12, m22], -1)], -2)
    values, vectors = torch.linalg.eigh(matrix)
    q = vectors[..., :, -1] * values[..., -1:].clamp_min(0).sqrt()
    q = torch.where(q[..., :1] < 0, -q, q)
    enough = (weights > 0).sum(dim=-1) >= 6
    return torch.where(enough[:, None], q, torch.zeros_like(q))


def _refine_plane(q: torch.Tensor, u: torch.Tensor, peak: torch.Tensor, weights: torch.Tensor, sigma: torch.Tensor,
                  rho0: torch.Tensor, floor: float, iterations: int = 12) -> torch.Tensor:
    """Levenberg-Marquardt fit of the plane to the correlations themselves, from ``q``.

    Minimises ``sum_k w_k (max(rho_k, floor) - max(rho0_k exp(-(q . u_k)^2 / (2 sigma_k^2)), floor))^2``
    per pair: unlike the fit of ``d^2``, a decorrelated patch (rho at the floor) only says that
    ``|d|`` is large there, and a patch near ``rho0`` is not amplified by the flat top of the curve.

    Args:
        q: [M, 3] start; u: [K, 3] scaled ``(1, x, y)``; peak, weights, sigma, rho0: [M, K].
    Returns:
        [M, 3] refined planes (oriented with q[0] >= 0), never worse than the start.
    """
    observed = peak.clamp_min(floor)
    inv_two_var = 1 / (2 * sigma.square())

    def cost_and_jacobian(plane):
        d = plane @ u.T  # [M, K]
        model = rho0 * torch.exp(-d.square() * inv_two_var)
        active = model > floor
        residual = observed - torch.where(active, model, torch.full_like(model, floor))
        # d model / d q = model * (-2 d inv_two_var) u; zero where the floor holds the model.
        slope = torch.where(active, -2 * model * d * inv_two_var, torch.zeros_like(model))
        jacobian = slope[..., None] * u  # [M, K, 3]
        return (weights * residual.square()).sum(-1), residual, jacobian

    damping = torch.full((len(q),), 1e-3, dtype=q.dtype)
    cost, residual, jacobian = cost_and_jacobian(q)
    eye = torch.eye(3, dtype=q.dtype)
    for _ in range(iterations):
        weighted = weights[..., None] * jacobian
        normal = weighted.transpose(-1, -2) @ jacobian
        gradient = (weighted * residual[..., None]).sum(-2)
        scale = normal.diagonal(dim1=-2, dim2=-1).clamp_min(1e-12)
        step = torch.linalg.solve(normal + damping[:, None, None] * torch.diag_embed(scale) + 1e-12 * eye,
                                  gradient[..., None])[..., 0]
        trial = q + step
        trial_cost, trial_residual, trial_jacobian = cost_and_jacobian(trial)
        better = trial_cost < cost
        q = torch.where(better[:, None], trial, q)
        cost = torch.where(better, trial_cost, cost)
        residual = torch.where(better[:, None], trial_residual, residual)
        jacobian = torch.where(better[:, None, None], trial_jacobian, jacobian)
        damping = torch.where(better, damping / 3, damping * 4).clamp(1e-6, 1e6)
    return torch.where(q[..., :1] < 0, -q, q)


def estimate_motion(measurements: PairMeasurements, calibration: SpeckleCalibration | None) -> MotionEstimate:
    """In-plane rigid motion and the unsigned out-of-plane field of every measured pair.

    In-plane: ``robust_rigid_2d`` of the patch centres onto their matched positions, base weights
    ``((rho - rho_min) / (1 - rho_min))^2`` on usable patches (a well-correlated match is a precise
    one). Out-of-plane (only with a ``calibration``; else zero): per patch ``d^2`` from the inverted
    curve, weighted by ``(rho / sigma^2)^2`` (``d^2 = 2 sigma^2 ln(rho0 / rho)`` moves by
    ``2 sigma^2 / rho`` per unit of correlation noise), ``_rank_one_plane`` for a start, then
    ``_refine_plane`` on the correlations themselves.

    Args:
        measurements: ``measure_pairs`` of one scan.
        calibration: the curve (and the settings the measurements were made with); None skips the
            out-of-plane estimate (planes and magnitudes 0).
    """
    settings = calibration.settings if calibration is not None else SpeckleSettings()
    centres = measurements.centres_mm  # [K, 2]
    count = len(measurements.frames)
    usable = measurements.usable
    peak = measurements.peak
    base = usable * ((peak - settings.rho_min) / (1 - settings.rho_min)).clamp_min(0).square()
    source = centres.expand(count, -1, -1)
    target = source + measurements.shift_mm
    angle, translation, _ = robust_rigid_2d(source, target, base, settings.robust_iterations,
                                            MIN_RESIDUAL_SCALE_PX * max(measurements.pixel_size_mm))

    plane = torch.zeros(count, 3, dtype=torch.float64)
    if len(centres):
        mean = centres.mean(dim=0)
        radius = (centres - mean).square().sum(-1).mean().sqrt().clamp_min(1e-6)
        scaled = torch.cat([torch.ones(len(centres), 1, dtype=torch.float64), (centres - mean) / radius], dim=-1)
        if calibration is not None and count:
            depth = centres[:, 1].expand(count, -1).contiguous()
            d2 = calibration.displacement_squared(peak, depth)
            sigma = torch.as_tensor(calibration.sigma_mm, dtype=torch.float64)[calibration.band_of(depth)]
            rho = peak.clamp_min(max(settings.rho_min, RHO_CLIP_LOW))
            weights = usable * (rho / sigma.square()).square()
            q = _rank_one_plane(scaled, d2, weights)
            rho0 = torch.as_tensor(calibration.rho0, dtype=torch.float64)[calibration.band_of(depth)]
            q = _refine_plane(q, scaled, peak, usable.to(torch.float64), sigma, rho0,
                              max(settings.rho_min, RHO_CLIP_LOW))
            # Back from the scaled coordinates to image mm: d = q0 + q1 (x - mx) / r + q2 (y - my) / r.
            slope = q[:, 1:] / radius
            plane = torch.cat([q[:, :1] - (slope * mean).sum(-1, keepdim=True), slope], dim=-1)
        u = torch.cat([torch.ones(len(centres), 1, dtype=torch.float64), centres], dim=-1)
    else:
        u = torch.zeros(0, 3, dtype=torch.float64)
    gram = u.T @ u
    magnitude = ((plane @ gram * plane).sum(-1) / max(len(centres), 1)).clamp_min(0).sqrt()
    kind_gram = None if measurements.image_size is None else \
        image_gram(np.diag([*measurements.pixel_size_mm, 1.0, 1.0]), *measurements.image_size)
    return MotionEstimate(angle, translation, plane, magnitude, gram, kind_gram)



# --------------------------------------------------------------------------------------------
# The out-of-plane sign
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
    frames = _as_frames(frames)
    kinds, _ = move_directions(estimate.plane, _kind_gram(estimate))
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
                          calibration.min_run_pairs, runs=runs, continues=continues, kind_gram=_kind_gram(estimate))
    if oracle is not None:
        signs = oracle_signs(signs, estimate.plane, magnitude, _kind_gram(estimate), runs, true_plane, oracle,
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
    """``estimate`` with each quarter turn's fields scaled to the calibrated size (module constants
    ``QUARTER_TURN_MIN_DEG``); unchanged where ``calibration.quarter_turn_deg`` is 0.

    A twist is a stretch of runs of the twist kind, fewer than ``pause_pairs`` stopped pairs apart; one
    whose net a_Y, with ``signs`` [M] as the ``moves`` rule gave them, exceeds ``QUARTER_TURN_DETECT`` of
    the calibrated quarter turn is one, and its fields (and magnitudes) are scaled by the calibrated
    size over its measured one. ``magnitude`` [M] and ``runs``: as the rule saw them (``orient_moves``).
    """
    if calibration.quarter_turn_deg <= 0:
        return estimate
    kinds, _ = move_directions(estimate.plane, _kind_gram(estimate))
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
    factor = torch.ones(len(estimate.plane), dtype=torch.float64)
    for pairs in (pairs for pairs in twists if pairs):
        net = abs(math.degrees(float(a_y[pairs].sum())))
        if net > QUARTER_TURN_DETECT * calibration.quarter_turn_deg:
            factor[pairs] = calibration.quarter_turn_deg / net
    return dataclasses.replace(estimate, plane=estimate.plane * factor[:, None], magnitude=estimate.magnitude * factor)


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


def plane_of_transforms(tforms: torch.Tensor) -> torch.Tensor:
    """The elevational displacement field of rigid transforms [..., 4, 4]: [..., 3] ``(p0, p1, p2)``.

    A point ``(x, y, 0)`` of the moving image moves out of plane by exactly ``p0 + p1 x + p2 y``
    (the z row of the transform: ``(t_z, R[2, 0], R[2, 1])``).
    """
    return torch.stack([tforms[..., 2, 3], tforms[..., 2, 0], tforms[..., 2, 1]], dim=-1)


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


def image_gram(scale, height: int, width: int, grid: int = 3) -> torch.Tensor:
    """``sum u u^T`` with ``u = (1, x, y)`` over a ``grid`` x ``grid`` lattice spanning the image (mm): [3, 3]."""
    points = torch.as_tensor(np.asarray(scale), dtype=torch.float64) @ tf.reference_image_points(
        (height, width), grid).double()
    u = torch.cat([torch.ones(1, points.shape[1], dtype=torch.float64), points[:2]])
    return u @ u.T


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
# Whole scans
# --------------------------------------------------------------------------------------------


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
    frames = _as_frames(frames)
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
    sx, sy = _pixel_size(scale)
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
    threshold = _best_stop_threshold(estimates)
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
        stop_threshold_mm: the stop level (``_best_stop_threshold``).
    Returns:
        ``(rock_deg, turn_pairs, min_run_pairs, pause_pairs, move_signs)``.
    """
    directions = [move_directions(estimate.plane, _kind_gram(estimate)) for estimate, _ in estimates]
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


def _best_stop_threshold(estimates) -> float:
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

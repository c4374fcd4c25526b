"""Classical speckle tracking: a pose estimator without learned weights, the floor learned models must beat.

What it is for
--------------
This module measures each pair of consecutive frames: the in-plane motion and the out-of-plane
displacement field up to its sign (``measure_pairs``, ``estimate_motion``), with the calibrated speckle
decorrelation curve they need (``SpeckleCalibration``). ``utils.speckle_sign`` chooses the signs and
``utils.speckle_scan`` runs a whole scan (``predict_scan_speckle``: every frame's transform from the
images alone, as ``utils.evaluation.predict_transforms`` returns it for a network, so
``generate_DDF.py --method speckle`` scores it with the same tables, files and plots) and calibrates
it on the training fold (``calibrate``); no learned weights.

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
- *The sign.* Decorrelation is symmetric: it says how far, never which way. The rules that choose
  the direction of each pair's field are ``utils.speckle_sign``; ``utils.speckle_scan`` runs a
  whole scan (``predict_scan_speckle``) and calibrates both layers on training scans (``calibrate``).

Conventions (``utils.transform``, DESIGN.md section 2): image mm ``x = column * S[0, 0]``,
``y = row * S[1, 1]``, ``z = 0`` with pixels counted from 1; the local transform of frame i is
``T_{i-1<-i}`` (frame i's image mm -> frame i-1's image mm); parameters ``[a_Z, a_Y, a_X, t_x, t_y,
t_z]`` with ``R = Rz(a_Z) Ry(a_Y) Rx(a_X)`` (radians, mm), built with
``utils.transform.params_to_matrix``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch

from utils import transform as tf
from utils.atomic import atomic_path
from utils.errors import InputError

SIGN_ZERO = "zero"
SIGN_CONTINUITY = "continuity"
SIGN_MOVES = "moves"
SIGN_RULES = (SIGN_ZERO, SIGN_CONTINUITY, SIGN_MOVES)
MOVE_KINDS = ("tilt", "twist")  # the ``moves`` rule's kinds of move, in the order of ``move_signs``

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


def as_frames(frames) -> torch.Tensor:
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


def pixel_size(scale) -> tuple[float, float]:
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
    frames = as_frames(frames)
    num_frames, height, width = frames.shape
    sx, sy = pixel_size(scale)
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
        sx, sy = pixel_size(scale)
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


def gram_of_kinds(estimate: MotionEstimate) -> torch.Tensor:
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


def plane_of_transforms(tforms: torch.Tensor) -> torch.Tensor:
    """The elevational displacement field of rigid transforms [..., 4, 4]: [..., 3] ``(p0, p1, p2)``.

    A point ``(x, y, 0)`` of the moving image moves out of plane by exactly ``p0 + p1 x + p2 y``
    (the z row of the transform: ``(t_z, R[2, 0], R[2, 1])``).
    """
    return torch.stack([tforms[..., 2, 3], tforms[..., 2, 0], tforms[..., 2, 1]], dim=-1)


def image_gram(scale, height: int, width: int, grid: int = 3) -> torch.Tensor:
    """``sum u u^T`` with ``u = (1, x, y)`` over a ``grid`` x ``grid`` lattice spanning the image (mm): [3, 3]."""
    points = torch.as_tensor(np.asarray(scale), dtype=torch.float64) @ tf.reference_image_points(
        (height, width), grid).double()
    u = torch.cat([torch.ones(1, points.shape[1], dtype=torch.float64), points[:2]])
    return u @ u.T

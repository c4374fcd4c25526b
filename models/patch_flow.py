"""PatchFlow: a 2-frame pose network that measures in-plane motion where the speckle is, at full resolution.

Why this design (issue 11): the motion between two consecutive frames is a fraction of a
millimetre, about one pixel, and the speckle that carries it is a few pixels wide. Down-sampling a
whole frame to fit a CPU budget averages that speckle away; working on full-resolution patches keeps
it at a fraction of the cost. So the network:

1. picks, per pair, ``num_patches`` of the ``patch_size`` squares of frame B (candidates every half
   patch), whatever the frame size. ``patch_selection="speckle"`` (the default) takes squares that
   hold signal throughout (the black corners outside the sector, bone shadows and the empty space
   below the arm hold none) and, among them, those whose contrast (standard deviation / mean) is
   closest to the frame's typical one: fully developed speckle, whose pattern moves with the
   tissue. The brightest, most contrasted squares are bright specular interfaces (bone surfaces,
   fascia); where such a surface is oblique to the image plane, moving the probe out of plane
   moves the line where the plane cuts it, so its echo slides within the image although the probe
   made no in-plane motion. Ranking by variance (``"texture"``, the choice before issue 11's
   validation study) takes exactly those first: untrained, it had a validation LPE 0.716 mm where
   the speckle rule has 0.626 (4 tusrec2025 validation scans; 0.615 for the true in-plane motion);
2. builds a cost volume per patch: the normalised cross-correlation of B's patch centre with A at
   every integer shift within ``radius`` pixels (FFT-based, no learned weights, no gradient);
3. a small CNN reads each correlation surface (with the patch's place in the image: the speckle size
   and the elevational decorrelation depend on depth) and outputs a refinement of the surface,
   whose local soft-argmax is the sub-pixel displacement, and a confidence, added to the surface's
   peak correlation times a learned factor;
4. fits the 2-D rigid motion of the image plane (rotation about the image normal, translation)
   that best moves the patch centres onto their displaced positions, weighted by the softmax of the
   confidences: a closed-form weighted Procrustes fit, differentiable, exact for an in-plane motion;
   optionally (``robust_iterations``) re-weighted by Tukey's biweight of each patch's residual and
   refitted, as the classical estimator (``utils.speckle.robust_rigid_2d``) does, so that patches
   that matched the wrong place (or tissue that moved differently) stop pulling the fit.

With the refinement at zero (``init_at_identity``) the network is plain block matching with
correlation-weighted fitting; training refines the sub-pixel estimate and the weights.

Output: the ``parameter`` prediction ``[a_Z, 0, 0, t_x, t_y, 0]`` of ``T_{A<-B}`` (frame B's image
mm -> frame A's, rotation about the image mm origin, radians and mm; ``utils.transform``
conventions), i.e. the local transform when A, B are consecutive. The out-of-plane DOFs (a_Y,
a_X, t_z) are predicted as zero by design: two frames give their size through speckle
decorrelation but not their direction, and a signed guess that is right half of the time makes
GPE/GLE worse than no guess (the direct 6-DOF regressions measured in issue 11 did).

A tissue point seen at ``c`` in frame B is seen at ``T_{A<-B} c`` in frame A, so the network's
per-patch displacement is "where does B's patch content lie in A": a patch of B centred at ``c``
matches A around ``c + d`` and the fit finds ``R c + t ~ c + d``.

Displacements are measured in pixels and converted to mm with ``pixel_mm`` (the training
calibration's by default); whole-scan prediction sets it to the predicted dataset's own pixel size
(``utils.evaluation.use_scan_pixel_size``), so a dataset with another ``S`` gets its motions in its
own millimetres. What was learned (the speckle's look at a given depth in pixels) still assumes a
similar probe and pixel size.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from models.registry import register_model
from utils.errors import InputError
from utils.speckle import BLACK_LEVEL, MIN_RESIDUAL_SCALE_PX, TUKEY_C

PATCH_SELECTIONS = ("speckle", "texture")


def weighted_rigid_fit_2d(points: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor):
    """The 2-D rigid motion ``q ~ R(angle) p + t`` minimising ``sum_k w_k |R p_k + t - q_k|^2``.

    Args:
        points, targets: [B, K, 2] positions before and after, (x, y) in mm.
        weights: [B, K] non-negative, summing to 1 over K.
    Returns:
        ``(angle [B], translation [B, 2])``, radians (counter-clockwise from x towards y, i.e. a
        rotation about the image normal z, as ``Rz``) and mm. Closed form (weighted Procrustes in
        2-D): the angle is the argument of ``sum w (p' . q' + i p' x q')`` of the centred points.
    """
    weights = weights.unsqueeze(-1)
    mean_p = (weights * points).sum(dim=1)
    mean_q = (weights * targets).sum(dim=1)
    p = points - mean_p[:, None]
    q = targets - mean_q[:, None]
    w = weights[..., 0]
    dot = (w * (p[..., 0] * q[..., 0] + p[..., 1] * q[..., 1])).sum(dim=1)
    cross = (w * (p[..., 0] * q[..., 1] - p[..., 1] * q[..., 0])).sum(dim=1)
    angle = torch.atan2(cross, dot)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotated_x = cos * mean_p[:, 0] - sin * mean_p[:, 1]
    rotated_y = sin * mean_p[:, 0] + cos * mean_p[:, 1]
    translation = torch.stack([mean_q[:, 0] - rotated_x, mean_q[:, 1] - rotated_y], dim=-1)
    return angle, translation


def weighted_median(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The weighted median of each row: the smallest value whose cumulative weight reaches half the row's.

    Args:
        values: [B, K]; weights: [B, K] non-negative (need not sum to 1).
    Returns:
        [B], one of each row's values (differentiable with respect to it; the choice is not).
    """
    ordered, order = values.sort(dim=1)
    cumulative = weights.gather(1, order).cumsum(dim=1)
    half = 0.5 * cumulative[:, -1:]
    index = (cumulative < half).sum(dim=1, keepdim=True).clamp_max(values.shape[1] - 1)
    return ordered.gather(1, index)[:, 0]


def robust_rigid_fit_2d(points: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, iterations: int,
                        min_scale: float | torch.Tensor):
    """``weighted_rigid_fit_2d`` re-weighted ``iterations`` times by Tukey's biweight of the residuals.

    Each pass measures every point's residual ``|R p + t - q|`` under the current fit, takes the
    pair's residual scale as 1.4826 x their weighted median (a robust standard deviation), at least
    ``min_scale``, multiplies the *given* weights by ``(1 - (r / (TUKEY_C scale))^2)^2`` (0 beyond
    ``TUKEY_C`` scales) and refits. As ``utils.speckle.robust_rigid_2d``, except that the median is
    weighted: a network gives every patch a positive weight, so an unweighted median would count
    the residuals of patches that carry almost none (textureless ones, whose match means nothing).
    Every step is differentiable (the biweight is smooth and 0 with zero slope at the cut-off);
    only the choice of the median point is not.

    Args:
        points, targets: [B, K, 2] positions before and after, (x, y) in mm.
        weights: [B, K] non-negative, summing to 1 over K.
        iterations: re-weighting passes after the first fit; 0 = ``weighted_rigid_fit_2d`` exactly.
        min_scale: floor of the residual scale, mm (a scalar or a 0-d tensor): residuals all far
            below the measurement's precision are no reason to drop anything.
    Returns:
        ``(angle [B], translation [B, 2], weights [B, K])``: the last fit and the normalised weights
        it used.
    """
    angle, translation = weighted_rigid_fit_2d(points, targets, weights)
    current = weights
    for _ in range(iterations):
        cos, sin = torch.cos(angle)[:, None], torch.sin(angle)[:, None]
        moved = torch.stack([cos * points[..., 0] - sin * points[..., 1],
                             sin * points[..., 0] + cos * points[..., 1]], dim=-1) + translation[:, None]
        # The floor keeps the gradient finite for an exact match (sqrt's slope at 0 is infinite).
        residual = (moved - targets).pow(2).sum(dim=-1).clamp_min(1e-20).sqrt()
        scale = (1.4826 * weighted_median(residual, weights)).clamp_min(min_scale)
        ratio = residual / (TUKEY_C * scale[:, None])
        current = weights * (1 - ratio.pow(2)).clamp_min(0).pow(2)
        # Never 0 / 0: the points at or below the weighted median (half the weight) have ratios of at
        # most 1 / (1.4826 TUKEY_C) = 0.14, so they keep most of their weight.
        current = current / current.sum(dim=1, keepdim=True)
        angle, translation = weighted_rigid_fit_2d(points, targets, current)
    return angle, translation, current


def _box_mean(images: torch.Tensor, side: int) -> torch.Tensor:
    """Mean of every ``side`` x ``side`` window of [N, P, P] images: [N, P - side + 1, P - side + 1].

    Separable (a column pass, then a row pass): ``2 side`` additions per window where a square
    ``avg_pool2d`` kernel costs ``side^2`` (48^2 here, most of the forward time).
    """
    columns = torch.nn.functional.avg_pool2d(images[:, None], (side, 1), stride=1)
    return torch.nn.functional.avg_pool2d(columns, (1, side), stride=1)[:, 0]


def normalised_cross_correlation(moving: torch.Tensor, fixed: torch.Tensor, radius: int) -> torch.Tensor:
    """Normalised cross-correlation of the centre of ``moving`` with ``fixed`` at every integer shift.

    Args:
        moving: [N, P, P] patches of the frame whose content is looked for (frame B).
        fixed: [N, P, P] patches of the frame it is looked for in (frame A), same places.
        radius: R, the largest shift in pixels; the template is ``moving``'s centre of side P - 2R.
    Returns:
        [N, 2R+1, 2R+1] correlation in [-1, 1]; entry ``(R + s_y, R + s_x)`` compares the template
        with ``fixed`` shifted by ``s_x`` columns and ``s_y`` rows: a peak there means the content of
        B at pixel u lies in A at u + s. FFT-based (the circular correlation never wraps for
        shifts within R), with the fixed patch's mean and spread taken over each shifted window.
    """
    size = moving.shape[-1]
    side = size - 2 * radius
    template = moving[:, radius:radius + side, radius:radius + side]
    template = template - template.mean(dim=(1, 2), keepdim=True)
    template = template / (template.pow(2).mean(dim=(1, 2), keepdim=True).sqrt() + 1e-6)
    padded = torch.nn.functional.pad(template, (0, size - side, 0, size - side))
    spectrum = torch.fft.rfft2(fixed) * torch.conj(torch.fft.rfft2(padded))
    correlation = torch.fft.irfft2(spectrum, s=(size, size))[:, :2 * radius + 1, :2 * radius + 1]
    window_mean = _box_mean(fixed, side)
    window_square = _box_mean(fixed.pow(2), side)
    window_std = (window_square - window_mean.pow(2)).clamp_min(0).sqrt()
    # The template has zero mean, so the fixed window's mean drops out of the numerator.
    return correlation / (side * side * (window_std + 1e-6))


def local_soft_argmax(logits: torch.Tensor, shift_grid: torch.Tensor, reach: int) -> torch.Tensor:
    """Sub-pixel peak of score maps: the softmax-weighted mean shift within ``reach`` pixels of the
    best integer shift.

    Args:
        logits: [N, S, S] scores of the shifts (S = 2R + 1).
        shift_grid: [S*S, 2] the (x, y) shift of each entry, row-major.
        reach: half-width of the neighbourhood around the integer peak.
    Returns:
        [N, 2] (x, y) shifts in pixels. Only the neighbourhood enters the softmax: over the whole map,
        the many low-scoring shifts of a weakly correlated patch would pull every estimate towards 0.
        The choice of the peak is not differentiable; the position within its neighbourhood is.
    """
    count, side = logits.shape[0], logits.shape[-1]
    peak = logits.reshape(count, -1).argmax(dim=1)
    peak_row = (peak // side).clamp(reach, side - 1 - reach)
    peak_col = (peak % side).clamp(reach, side - 1 - reach)
    offsets = torch.arange(-reach, reach + 1, device=logits.device)
    rows = (peak_row[:, None, None] + offsets[None, :, None]).expand(-1, -1, 2 * reach + 1)
    cols = (peak_col[:, None, None] + offsets[None, None, :]).expand(-1, 2 * reach + 1, -1)
    index = (rows * side + cols).reshape(count, -1)
    local = torch.gather(logits.reshape(count, -1), 1, index)
    weights = torch.softmax(local, dim=1)
    return (weights[..., None] * shift_grid[index]).sum(dim=1)


class PatchFlowNet(nn.Module):
    """[B, 2, H, W] frames in [0, 1] -> [B, 6] ``parameter`` prediction of ``T_{frame 0 <- frame 1}``.

    Per patch, a cost volume (the normalised cross-correlation at every shift within ``radius``
    pixels, as optical-flow networks build one) is read by a small CNN that outputs a refinement
    of the correlation surface, whose soft-argmax is the sub-pixel displacement, and a confidence;
    the weighted rigid fit of all patches gives the in-plane motion.

    Args:
        pixel_mm: (x, y) pixel size in mm of the input frames (the calibration's S[0,0], S[1,1]).
        patch_size: side of the square patches, pixels.
        num_patches: patches of frame B used per pair (``patch_selection`` picks them).
        radius: the largest displacement looked for, pixels (the template is patch_size - 2 radius).
        width: channels of the CNN on the cost volume.
        jitter: during training, the candidate grid is shifted at random by less than its stride
            (the same shift for the whole batch): more distinct patches from few scans, and a model
            that does not depend on exact patch places.
        robust_iterations: Tukey-biweight re-weighting passes of the rigid fit after the first
            (``robust_rigid_fit_2d``, in training too); 0 = the plain weighted fit, as before the
            option existed (no parameter depends on it: a checkpoint loads with any value).
        patch_selection: ``"speckle"`` (squares full of signal, of typical speckle contrast, first)
            or ``"texture"`` (the most varied squares first); see the module docstring.
    """

    PEAK_REACH = 2  # pixels around the integer peak that the sub-pixel estimate averages over
    # A square holds signal if this share of its pixels is above the black level (the speckle
    # estimator's rule, utils.speckle.SpeckleSettings.min_signal and BLACK_LEVEL, on [0, 1] frames).
    MIN_SIGNAL = 0.9
    BLACK_LEVEL = BLACK_LEVEL / 255.0

    def __init__(self, pixel_mm=(1.0, 1.0), patch_size: int = 64, num_patches: int = 32, radius: int = 8,
                 width: int = 12, jitter: bool = True, robust_iterations: int = 0,
                 patch_selection: str = "speckle"):
        super().__init__()
        if len(pixel_mm) != 2 or not all(float(v) > 0 for v in pixel_mm):
            raise InputError(f"pixel_mm={pixel_mm!r}: expected two positive pixel sizes (x, y) in mm")
        if int(patch_size) < 16 or int(patch_size) % 8:
            raise InputError(f"patch_size={patch_size!r}: expected a multiple of 8, at least 16")
        if not 1 <= radius < patch_size // 4:
            raise InputError(f"radius={radius!r}: expected 1 <= radius < patch_size / 4 = {patch_size / 4}")
        if isinstance(robust_iterations, bool) or not isinstance(robust_iterations, int) or robust_iterations < 0:
            raise InputError(f"robust_iterations={robust_iterations!r}: expected an integer >= 0 "
                             f"(0 = no re-weighting)")
        if patch_selection not in PATCH_SELECTIONS:
            raise InputError(f"patch_selection={patch_selection!r}: expected one of {list(PATCH_SELECTIONS)}")
        self.patch_selection = patch_selection
        self.patch_size, self.num_patches, self.radius = int(patch_size), int(num_patches), int(radius)
        self.jitter = bool(jitter)
        self.robust_iterations = robust_iterations
        self.register_buffer("pixel_mm", torch.tensor([float(v) for v in pixel_mm]))
        shifts = torch.arange(-self.radius, self.radius + 1, dtype=torch.float32)
        grid_y, grid_x = torch.meshgrid(shifts, shifts, indexing="ij")
        self.register_buffer("shift_grid", torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1))  # (x, y)
        # Sharpness of the soft-argmax over the correlation surface (learned, log scale): NCC values
        # differ by a few hundredths near a peak, so the surface is scaled before the softmax.
        self.log_sharpness = nn.Parameter(torch.tensor(math.log(20.0)))
        w = int(width)
        self.surface = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(inplace=True),
        )
        self.refine = nn.Conv2d(w, 1, 3, padding=1)  # added to the scaled correlation before the softmax
        self.confidence = nn.Sequential(nn.Linear(2 * w + 3, 64), nn.ReLU(inplace=True), nn.Linear(64, 1))
        # A patch's weight in the fit starts as exp(peak correlation x this): a patch that matches well
        # counts, a black one (outside the sector, correlation 0) or a decorrelated one hardly does.
        self.peak_weight = nn.Parameter(torch.tensor(10.0))
        # A slight preference for small shifts breaks ties on flat surfaces (black patches) at 0,
        # not at the first entry (the largest negative shift).
        self.register_buffer("centre_prior", -1e-3 * self.shift_grid.pow(2).sum(dim=1).reshape(
            2 * self.radius + 1, 2 * self.radius + 1))

    def set_label_statistics(self, mean: torch.Tensor, std: torch.Tensor, frame_size) -> None:
        """Nothing to scale: displacements come out of the soft-argmax in pixels, whatever their spread."""

    def init_at_identity(self) -> None:
        """Start as plain block matching: no refinement of the surface, equal confidence everywhere."""
        with torch.no_grad():
            self.refine.weight.zero_()
            self.refine.bias.zero_()
            last = self.confidence[-1]
            last.weight.mul_(0.01)
            last.bias.zero_()

    def _origins(self, frames: torch.Tensor) -> torch.Tensor:
        """Top-left corners [B, K, 2] (row, column) of each pair's K patches (``patch_selection``).

        Candidates lie on a grid of stride ``patch_size / 2`` (neighbours overlap by half), scored
        from frame B's pixels:

        - ``"texture"``: by their variance, so black sector corners, bone shadows and the empty space
          below the arm (variance 0) are taken last;
        - ``"speckle"``: the squares holding signal (``MIN_SIGNAL`` of their pixels above
          ``BLACK_LEVEL``) first, nearest the median contrast (std / mean) of the frame's squares
          holding signal first; then, if there are fewer than K of them, the others by variance.

        The ``num_patches`` best are kept. In training the candidate grid is shifted at random (the
        same shift for the batch): more distinct patches from few scans.
        """
        batch = frames.shape[0]
        size, stride = self.patch_size, self.patch_size // 2
        offset = (0, 0)
        if self.training and self.jitter:
            offset = tuple(int(v) for v in torch.randint(0, stride, (2,)))
        image = frames[:, 1:2, offset[0]:, offset[1]:].float()
        # Window means in two stages (blocks of patch_size / 8, then windows of 8 x 8 blocks every 4
        # blocks): the same numbers as one pooling with the patch-sized kernel, at a 64th of the work.
        block = size // 8
        block_mean = torch.nn.functional.avg_pool2d(image, block)
        block_square = torch.nn.functional.avg_pool2d(image.pow(2), block)
        mean = torch.nn.functional.avg_pool2d(block_mean, 8, stride=4)
        square = torch.nn.functional.avg_pool2d(block_square, 8, stride=4)
        texture = (square - mean.pow(2))[:, 0]  # [B, candidate rows, candidate columns]
        score = texture if self.patch_selection == "texture" else self._speckle_score(image, mean[:, 0], texture)
        best = score.reshape(batch, -1).topk(min(self.num_patches, score[0].numel()), dim=1).indices
        columns = texture.shape[2]
        rows = best // columns * stride + offset[0]
        cols = best % columns * stride + offset[1]
        return torch.stack([rows, cols], dim=-1)

    def _speckle_score(self, image: torch.Tensor, mean: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
        """Candidate scores of the ``"speckle"`` rule, higher first: in (-inf, 0] for the squares
        holding signal (minus the distance of their contrast from the frame's median), in
        [-1001, -1000] for the others (their variance over the frame's largest), so every square
        holding signal comes before any other and the others keep the texture order."""
        block = self.patch_size // 8
        lit = torch.nn.functional.avg_pool2d((image > self.BLACK_LEVEL).to(image.dtype), block)
        signal = torch.nn.functional.avg_pool2d(lit, 8, stride=4)[:, 0] >= self.MIN_SIGNAL
        contrast = variance.clamp_min(0).sqrt() / mean.clamp_min(self.BLACK_LEVEL)
        flat = contrast.reshape(contrast.shape[0], -1)
        typical = torch.where(signal.reshape_as(flat), flat, torch.nan).nanmedian(dim=1).values  # NaN: none
        speckle_like = -(contrast - typical[:, None, None]).abs()
        largest = variance.reshape(variance.shape[0], -1).amax(dim=1).clamp_min(1e-12)
        others = variance / largest[:, None, None] - 1001.0
        return torch.where(signal, speckle_like, others)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.measure(frames)["params"]

    @torch.no_grad()
    def correlate(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The unlearned first half of ``measure``: which patches, and their cost volumes.

        Args:
            frames: [B, 2, H, W] frame pairs in [0, 1].
        Returns:
            ``(correlation [B*K, 2R+1, 2R+1], origins [B, K, 2], position [B, K, 2])``: each patch's
            normalised cross-correlation at every shift (``normalised_cross_correlation``), its
            top-left corner (row, column, 0-based) and its centre (x, y) relative to the frame,
            -0.5..0.5. Nothing here is learned, so no graph is kept (most of a step's memory and a
            third of its time otherwise).
        """
        if frames.ndim != 4 or frames.shape[1] != 2:
            raise InputError(f"PatchFlowNet takes [B, 2, H, W] frame pairs; got {tuple(frames.shape)}")
        batch, _, height, width = frames.shape
        size = self.patch_size
        origins = self._origins(frames)  # [B, K, 2]
        num_patches = origins.shape[1]
        span = torch.arange(size, device=frames.device)
        rows = (origins[..., 0, None, None] + span[:, None]).expand(-1, -1, size, size)  # [B, K, P, P]
        cols = (origins[..., 1, None, None] + span[None, :]).expand(-1, -1, size, size)
        sample = torch.arange(batch, device=frames.device)[:, None, None, None]
        patches = torch.stack([frames[:, 0][sample, rows, cols], frames[:, 1][sample, rows, cols]], dim=2)
        patches = patches.reshape(batch * num_patches, 2, size, size).float()
        correlation = normalised_cross_correlation(patches[:, 1], patches[:, 0], self.radius)  # [N, 2R+1, 2R+1]
        # Patch centres: pixel coordinates count from 1 (DESIGN.md), so a patch spanning 0-based
        # columns left..left+P-1 is centred on column left + P/2 + 0.5.
        centres_px = origins.flip(-1).to(correlation.dtype) + (size / 2 + 0.5)  # [B, K, 2] (x, y)
        relative = centres_px / torch.tensor([width, height], dtype=correlation.dtype, device=frames.device) - 0.5
        return correlation, origins, relative

    def measure(self, frames: torch.Tensor) -> dict:
        """The prediction and what it was made from, for networks built on this one (``seq_flow``).

        Returns a dict: ``params`` [B, 6] (what ``forward`` returns); ``peak`` [B, K] each patch's
        best normalised cross-correlation (how much its speckle decorrelated: out-of-plane motion);
        ``position`` [B, K, 2] its centre (x, y) relative to the frame, -0.5..0.5; ``weight`` [B, K]
        its weight in the rigid fit (softmax of the confidences, summing to 1).
        """
        batch = frames.shape[0]
        size, radius = self.patch_size, self.radius
        correlation, origins, relative = self.correlate(frames)
        num_patches = origins.shape[1]
        centres_px = origins.flip(-1).to(correlation.dtype) + (size / 2 + 0.5)  # [B, K, 2] (x, y)
        centres_mm = centres_px * self.pixel_mm
        position = relative.reshape(-1, 2)  # [N, 2]

        # The CNN sees the surface and where the patch is (depth changes the speckle size and the
        # elevational beam width, hence how a peak looks).
        side = 2 * radius + 1
        maps = torch.cat([correlation[:, None], position[:, :, None, None].expand(-1, -1, side, side)], dim=1)
        features = self.surface(maps)
        logits = correlation * self.log_sharpness.exp() + self.refine(features)[:, 0] + self.centre_prior
        displacement_px = local_soft_argmax(logits, self.shift_grid, self.PEAK_REACH)  # [N, 2] (x, y)
        pooled = torch.cat([features.amax(dim=(2, 3)), features.mean(dim=(2, 3)),
                            correlation.amax(dim=(1, 2))[:, None], position], dim=1)
        peak = correlation.amax(dim=(1, 2))
        confidence = (self.confidence(pooled)[:, 0] + self.peak_weight * peak).reshape(batch, num_patches)

        displacement = (displacement_px * self.pixel_mm).reshape(batch, num_patches, 2)
        weights = torch.softmax(confidence, dim=1)
        points = centres_mm
        # The floor of the residual scale: a tenth of a pixel, as the classical estimator's (sub-pixel
        # peaks are good to a few hundredths of one). pixel_mm is read here, not at construction,
        # because whole-scan prediction sets it to the scanned data's pixel size.
        min_scale = MIN_RESIDUAL_SCALE_PX * self.pixel_mm.max()
        angle, translation, _ = robust_rigid_fit_2d(points, points + displacement, weights, self.robust_iterations,
                                                    min_scale)
        zero = torch.zeros_like(angle)
        params = torch.stack([angle, zero, zero, translation[:, 0], translation[:, 1], zero], dim=1)
        return {"params": params, "peak": peak.reshape(batch, num_patches), "position": relative,
                "weight": weights}


@register_model("patch_flow")
def patch_flow(in_frames: int, pred_dim: int, pixel_mm=(1.0, 1.0), patch_size: int = 64, num_patches: int = 32,
               radius: int = 8, width: int = 12, robust_iterations: int = 0,
               patch_selection: str = "speckle") -> nn.Module:
    """PatchFlowNet: [B, 2, H, W] frames in [0, 1] -> [B, 6] in-plane ``parameter`` prediction."""
    if in_frames != 2 or pred_dim != 6:
        raise InputError(f"patch_flow predicts one pair's 6 parameters from 2 frames (NUM_SAMPLES=2, "
                         f"PRED_TYPE=parameter); got in_frames={in_frames}, pred_dim={pred_dim}")
    return PatchFlowNet(pixel_mm=pixel_mm, patch_size=patch_size, num_patches=num_patches, radius=radius, width=width,
                        robust_iterations=robust_iterations, patch_selection=patch_selection)

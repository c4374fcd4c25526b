"""Bone surfaces from ultrasound frames, and their distance to a synthetic phantom's true radius and ulna.

What pose errors do to anatomy: the same bone echoes, placed in 3D with ground-truth poses and with
predicted poses, are compared with the bones' true surfaces. Two parts:

- ``detect_bone_ridges`` finds, per frame and per image column, the bone's echo the way a reader
  sees it: a bright ridge with an acoustic shadow below it. Bone reflects and absorbs nearly all the
  sound, so the ridge is the last echo along the beam, and its shadow is bounded on both sides by
  tissue that goes on deeper beside the bone. That last test tells a bone from the arm's far
  (posterior) skin and its flanks, which are also the last echo of their beams but have only the
  void beyond the arm beside them. It costs the bones seen along their length (their shadow spans the
  whole frame): on a rotation scan the transverse half of the frames carries the score.
  ``detect_scan_ridges`` runs it over a scan, ``ridge_points`` maps the ridge pixels into the
  reference frame with any set of transforms, ``T_{0<-i} . S . [x, y, 0, 1]``.
- ``phantom_of_scan`` rebuilds a simulated scan's ``ForearmPhantom`` from its side file
  (``simulation.dataset``), and ``bone_distances`` gives every point's distance to the nearest true
  bone surface: frame-0 image mm -> tissue with the side file's exact ``T_tissue<-image`` of frame 0,
  then the phantom's analytic ``bone_surface_distance``.

With ground-truth poses the distances measure the detector alone: where along its bright echo it puts
the surface and its rare wrong detections. The simulated cortex echoes from its first millimetre, the
upper half brightest, so the ridge peak lies ~0.45 mm inside the bone (measured on 480x640 frames:
signed distance -0.46 mm on average, 5-95 % from -0.65 to -0.28 mm). With predicted poses the same
points move with the pose errors, so the increase is what the trackerless method's drift does to the
anatomy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from utils.reconstruction import frames_to_reference, num_frames_of, read_frame_chunks


@dataclass(frozen=True)
class RidgeSettings:
    """How a bone echo looks; lengths in mm, grey levels on the frames' 0-255 scale (after smoothing).

    The defaults fit B-mode frames with a log-compressed 0-255 range (the simulator's and typical
    scanners'); real data with another gain may need ``min_ridge``, ``strong_ridge`` and ``max_shadow``
    changed.
    """

    smooth_axial_mm: float = 0.25  # Gaussian sigma along the beam before the search (speckle)
    smooth_lateral_mm: float = 0.5  # across the beam
    min_ridge: float = 80.0  # the bone echo is among the brightest structures
    # A ridge this bright counts as bone even without tissue beside its shadow (a bone seen along its
    # length shadows the whole frame). Off by default: on simulated frames the arm's far skin can be as
    # bright, and a wrong surface costs more than a missed one.
    strong_ridge: float = math.inf
    shadow_gap_mm: float = 1.0  # the shadow starts this far below the ridge (the echo's own tail)
    min_shadow_mm: float = 5.0  # the shadow's dark window, which must lie inside the sector
    max_shadow: float = 12.0  # mean grey level of the shadow's first min_shadow_mm at most
    max_echo_fraction: float = 0.01  # at most this fraction of the shadow, to the sector's end, >= tissue_level
    tissue_level: float = 20.0  # grey level that counts as an echo when looking for deeper tissue
    lateral_mm: float = 12.0  # look this far sideways for tissue deeper than the ridge
    deeper_mm: float = 6.0  # ... that goes on at least this much deeper than the ridge
    max_step_mm: float = 1.0  # depth change between neighbouring columns of one surface
    min_run_mm: float = 2.0  # shortest accepted piece of surface (drops isolated speckle peaks)

    def to_dict(self) -> dict:
        return asdict(self)


def detect_bone_ridges(frame, mask, pixel_mm, settings: RidgeSettings = RidgeSettings()) -> np.ndarray:
    """Bone echo pixels of one frame: float64 [P, 2] ``(x, y)``, 1-based pixels, y with sub-pixel precision.

    Args:
        frame: uint8 [H, W] (row y, column x).
        mask: bool [H, W], the ultrasound sector; the shadow must lie inside it (so the sector's black
            surround is never taken for a shadow).
        pixel_mm: ``(s_x, s_y)``, the calibration's pixel size.
        settings: the echo's appearance (``RidgeSettings``).

    Per image column (beams of a linear probe; within the +-33 degrees of the simulated curvilinear
    probe a column stays within a few millimetres of a beam over the shadow's first centimetres), a
    pixel is a bone echo when, after smoothing:

    1. it is a local maximum along the column, at least ``min_ridge``;
    2. it is the last echo of the beam: from ``shadow_gap_mm`` below it, the first ``min_shadow_mm``
       are dark (mean at most ``max_shadow``) and inside the sector, and down to the sector's end at
       most ``max_echo_fraction`` of the pixels reach ``tissue_level``;
    3. on both sides, within ``lateral_mm``, tissue goes on at least ``deeper_mm`` deeper (the shadow
       is bounded, unlike the void below the arm's far skin or beside its flanks), or the ridge is at
       least ``strong_ridge`` (off by default);
    4. it belongs to a run of neighbouring columns of smoothly varying depth at least ``min_run_mm`` wide.

    At most one point per column: the brightest passing pixel, refined to sub-pixel depth.
    """
    from scipy import ndimage

    s = settings
    sx, sy = float(pixel_mm[0]), float(pixel_mm[1])
    mask = np.asarray(mask, dtype=bool)
    image = ndimage.gaussian_filter(np.asarray(frame, dtype=np.float32),
                                    (s.smooth_axial_mm / sy, s.smooth_lateral_mm / sx), mode="nearest")
    image[~mask] = 0.0
    height, width = image.shape
    rows = np.arange(height)
    gap = max(1, int(round(s.shadow_gap_mm / sy)))
    min_length = max(1, int(round(s.min_shadow_mm / sy)))
    echo = image >= s.tissue_level
    # Window sums along the columns from cumulative sums: the shadow's first min_shadow_mm must be
    # dark on average and inside the sector, and the whole rest of the column's sector almost free of
    # echoes (a mean over a long void would hide the far skin's thin bright line).
    def column_cumsum(values, dtype):
        out = np.zeros((height + 1, width), dtype)
        np.cumsum(values, axis=0, dtype=dtype, out=out[1:])
        return out

    total = column_cumsum(image, np.float32)  # float32: ~1e-7 relative, far below a grey level
    inside, echoes = column_cumsum(mask, np.int32), column_cumsum(echo, np.int32)
    first = np.minimum(rows + gap, height)
    window_end = np.minimum(first + min_length, height)
    dark = (inside[window_end] - inside[first] == min_length) & (
        total[window_end] - total[first] <= s.max_shadow * min_length)
    end = np.where(mask.any(axis=0), height - np.argmax(mask[::-1], axis=0), 0)  # one past the sector, per column
    rest = np.maximum(end[None, :] - first[:, None], 1)
    quiet = echoes[end, np.arange(width)][None, :] - echoes[first] <= s.max_echo_fraction * rest
    shadowed = dark & quiet

    ridge = np.zeros_like(mask)
    ridge[1:-1] = (image[1:-1] >= image[:-2]) & (image[1:-1] > image[2:]) & (image[1:-1] >= s.min_ridge)
    candidate = ridge & shadowed & mask

    # Deepest echo of every column, and the deepest within lateral_mm on each side: a bone's shadow has
    # tissue going on deeper on both sides (the bone lies inside the arm); the void beyond the arm's
    # skin, below its far side or beside its flanks, has not.
    deepest = np.where(echo.any(axis=0), height - 1 - np.argmax(echo[::-1], axis=0), -1)
    reach = max(1, int(round(s.lateral_mm / sx)))
    padded = np.concatenate([np.full(reach, -1), deepest, np.full(reach, -1)])
    windows = np.lib.stride_tricks.sliding_window_view(padded, reach)  # windows[m] = padded[m:m + reach]
    left = windows[:width].max(axis=1)  # columns c - reach .. c - 1
    right = windows[reach + 1:reach + 1 + width].max(axis=1)  # columns c + 1 .. c + reach
    need = rows[:, None] + s.deeper_mm / sy
    bounded = (left[None, :] >= need) & (right[None, :] >= need)
    candidate &= bounded | (image >= s.strong_ridge)

    cols = np.flatnonzero(candidate.any(axis=0))
    ys = np.argmax(np.where(candidate[:, cols], image[:, cols], -1.0), axis=0)  # brightest per column
    keep = _long_runs(cols, ys * sy, s.max_step_mm, max(1, int(round(s.min_run_mm / sx))))
    cols, ys = cols[keep], ys[keep]
    # Sub-pixel peak: the vertex of the parabola through the ridge row and its two neighbours.
    above, centre, below = image[ys - 1, cols], image[ys, cols], image[np.minimum(ys + 1, height - 1), cols]
    curvature = above - 2 * centre + below
    offset = np.where(curvature < 0, 0.5 * (above - below) / np.where(curvature < 0, curvature, -1.0), 0.0)
    return np.stack([cols + 1.0, ys + 1.0 + np.clip(offset, -0.5, 0.5)], axis=1)


def _long_runs(cols: np.ndarray, depth_mm: np.ndarray, max_step_mm: float, min_columns: int) -> np.ndarray:
    """bool mask of detections in runs of adjacent columns with smooth depth, at least ``min_columns`` long."""
    if cols.size == 0:
        return np.zeros(0, dtype=bool)
    breaks = (np.diff(cols) != 1) | (np.abs(np.diff(depth_mm)) > max_step_mm)
    run_id = np.concatenate([[0], np.cumsum(breaks)])
    run_length = np.bincount(run_id)
    return run_length[run_id] >= min_columns


def detect_scan_ridges(frames, mask, pixel_mm, settings: RidgeSettings = RidgeSettings(), frame_step: int = 1,
                       chunk: int = 64):
    """Bone echoes of every ``frame_step``-th frame: ``(frame_index [P] int64, pixels [P, 2] float64)``.

    ``frames`` is any source ``utils.reconstruction.read_frame_chunks`` reads; pixels as in
    ``detect_bone_ridges``. The detection does not depend on poses: map the same pixels with
    ground-truth and predicted transforms (``ridge_points``) to compare them.
    """
    if frame_step < 1:
        raise ValueError(f"frame_step={frame_step} must be >= 1")
    index, pixels = [], []
    for start, block in read_frame_chunks(frames, chunk):
        for offset in range((-start) % frame_step, len(block), frame_step):
            found = detect_bone_ridges(block[offset], mask, pixel_mm, settings)
            index.append(np.full(len(found), start + offset, dtype=np.int64))
            pixels.append(found)
    if not pixels:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 2))
    return np.concatenate(index), np.concatenate(pixels)


def ridge_points(frame_index, pixels, to_reference, scale) -> np.ndarray:
    """float64 [P, 3]: pixels [P, 2] ``(x, y)`` of frames ``frame_index`` [P] in the reference frame (mm).

    ``to_reference`` [N, 4, 4] from ``frames_to_reference``: ``T_{0<-i} . S . [x, y, 0, 1]``.
    """
    pixels = np.asarray(pixels, dtype=np.float64).reshape(-1, 2)
    scale = np.asarray(scale, dtype=np.float64)
    image_mm = np.stack([pixels[:, 0] * scale[0, 0], pixels[:, 1] * scale[1, 1], np.zeros(len(pixels)),
                         np.ones(len(pixels))], axis=1)  # S is diagonal (utils.calibration checks it)
    tforms = np.asarray(to_reference, dtype=np.float64)[np.asarray(frame_index, dtype=np.int64)]
    return np.einsum("pij,pj->pi", tforms[:, :3], image_mm)


def bone_surface_points(frames, global_transforms, scale, mask, settings: RidgeSettings = RidgeSettings(),
                        frame_step: int = 1, chunk: int = 64):
    """Bone echoes of a scan in the reference frame.

    Args:
        frames: uint8 [N, H, W] source (see ``utils.reconstruction.read_frame_chunks``).
        global_transforms: ``T_{0<-i}`` [N-1, 4, 4] or [N, 4, 4] (``frames_to_reference``).
        scale: ``S`` [4, 4].
        mask: bool [H, W] sector.
        frame_step: use every ``frame_step``-th frame.
    Returns:
        ``(points [P, 3] float64 mm in the reference frame, frame_index [P] int64, pixels [P, 2])``.
    """
    scale = np.asarray(scale, dtype=np.float64)
    to_reference = frames_to_reference(global_transforms, num_frames_of(frames))
    index, pixels = detect_scan_ridges(frames, mask, (scale[0, 0], scale[1, 1]), settings, frame_step, chunk)
    return ridge_points(index, pixels, to_reference, scale), index, pixels


# --------------------------------------------------------------------------------------------
# The phantom's true bones
# --------------------------------------------------------------------------------------------


def side_file_of(root, subject: int, scan_name: str) -> Path:
    """Where a simulated scan keeps its side data (``simulation.dataset``); it may not exist."""
    from simulation.dataset import side_file_path

    return side_file_path(root, subject, scan_name)


def phantom_of_scan(side_path):
    """``(ForearmPhantom, tform_tissue_from_image [N, 4, 4] float64)`` of a simulated scan's side file.

    Raises FileNotFoundError if the file is missing and ValueError if it holds no phantom parameters
    (a scan rendered with a stand-in phantom).
    """
    from simulation.dataset import read_side_file
    from simulation.phantom import ForearmPhantom, PhantomParameters

    side = read_side_file(side_path)
    params = side.get("phantom_parameters")
    if not params:
        raise ValueError(f"{side_path}: no phantom_parameters: the scan was not rendered from a ForearmPhantom")
    return ForearmPhantom(PhantomParameters.from_dict(params)), np.asarray(side["tform_tissue_from_image"], np.float64)


def bone_distances(points_mm, phantom, tform_tissue_from_reference) -> np.ndarray:
    """float64 [P]: distance (mm) from reference-frame points [P, 3] to the nearest true bone surface.

    ``tform_tissue_from_reference`` maps the reference frame to the phantom's tissue frame: for the
    challenge's global transforms that is ``tform_tissue_from_image[0]`` of the side file.
    """
    points = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3)
    tissue = points @ np.asarray(tform_tissue_from_reference)[:3, :3].T + np.asarray(tform_tissue_from_reference)[:3, 3]
    return phantom.bone_surface_distance(tissue)


def distance_summary(distances) -> dict:
    """Mean, median, 95th percentile and count of distances (mm); NaN when there are none."""
    d = np.asarray(distances, dtype=np.float64)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return {"count": 0, "mean_mm": float("nan"), "median_mm": float("nan"), "p95_mm": float("nan")}
    return {"count": int(d.size), "mean_mm": float(d.mean()), "median_mm": float(np.median(d)),
            "p95_mm": float(np.percentile(d, 95))}

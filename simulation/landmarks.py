"""Landmarks of simulated scans: visible anatomical boundary points, with their 3D tissue positions.

A scan gets K landmarks (100 in the 2025 data, 20 in 2024), rows ``(frame from 0, x from 1, y from
1)`` as in the challenge files (DESIGN.md section 2). How they are chosen (SIMULATOR.md, "Landmarks"):

- frames: stratified across 1..N-1 with jitter (one per stratum), never frame 0, which has no DDF row;
- pixels: the image plane is mapped through the frame's pose into the tissue and the phantom's labels
  are read on the pixel grid; candidates are pixels whose label differs from a 4-neighbour's (bone
  top, fascia and septa, vessel walls, skin/fat: wherever tissue classes meet), at least
  ``MIN_SECTOR_MARGIN_PX`` pixels inside the sector, and bright in the rendered frame (which also
  keeps them out of acoustic shadow). Where the phantom names its label classes, the categories are
  drawn with SIMULATOR.md's weights; otherwise every boundary pixel is equally likely.
- each landmark's tissue point is ``T_tissue<-image_mm(frame) . S . [x, y, 0, 1]``: with
  ``tforms = T_cam<-tissue . T_tissue<-image_mm . C^-1`` it equals
  ``T_cam<-tissue^-1 . tforms[frame] . C . S . [x, y, 0, 1]``, which the tests check.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

MIN_SECTOR_MARGIN_PX = 5
# Weights of boundary categories (SIMULATOR.md): bone top, fascia/septa, vessel walls, skin/fat.
CATEGORY_WEIGHTS = {"bone": 0.3, "fascia": 0.3, "vessel": 0.2, "skin": 0.2}


def stratified_frames(rng: np.random.Generator, num_frames: int, count: int) -> np.ndarray:
    """``count`` frame indices in 1..N-1, one uniformly inside each of ``count`` equal strata, sorted.

    With more landmarks than frames, strata are shorter than a frame and indices repeat (different
    pixels are chosen on a repeated frame). int64 [count].
    """
    if num_frames < 2:
        raise ValueError(f"num_frames={num_frames}: landmarks need at least 2 frames (frame 0 is excluded)")
    if count < 1:
        raise ValueError(f"count={count} landmarks: expected >= 1")
    edges = 1.0 + (num_frames - 1) * np.arange(count + 1) / count
    picks = np.floor(edges[:-1] + rng.random(count) * (edges[1:] - edges[:-1])).astype(np.int64)
    return np.clip(picks, 1, num_frames - 1)


def pixel_points_mm(height: int, width: int, scale: np.ndarray, stride: int = 1):
    """Homogeneous image-mm points [4, M] of every ``stride``-th pixel and their (x, y) 1-based [M, 2]."""
    xs = np.arange(1, width + 1, stride)
    ys = np.arange(1, height + 1, stride)
    grid_x, grid_y = np.meshgrid(xs, ys)
    pixels = np.stack([grid_x.ravel(), grid_y.ravel(), np.zeros(grid_x.size), np.ones(grid_x.size)]).astype(np.float64)
    return scale @ pixels, np.stack([grid_x.ravel(), grid_y.ravel()], axis=1)


def label_boundaries(labels: np.ndarray) -> np.ndarray:
    """bool [h, w]: grid pixels whose label differs from one of their 4-neighbours."""
    edge = np.zeros(labels.shape, dtype=bool)
    diff_y = labels[1:, :] != labels[:-1, :]
    diff_x = labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= diff_y
    edge[:-1, :] |= diff_y
    edge[:, 1:] |= diff_x
    edge[:, :-1] |= diff_x
    return edge


def _categories(labels: np.ndarray, boundary: np.ndarray, label_categories: dict | None) -> np.ndarray:
    """int [h, w] category index (into CATEGORY_WEIGHTS) of each boundary pixel, -1 where unknown.

    A boundary pixel takes the category of the highest-priority class among itself and its
    4-neighbours (bone > vessel > fascia > skin), so a bone surface pixel counts as bone whatever
    tissue lies above it.
    """
    names = list(CATEGORY_WEIGHTS)
    out = np.full(labels.shape, -1, dtype=np.int64)
    if not label_categories:
        return out
    for name in ("skin", "fascia", "vessel", "bone"):  # later wins
        codes = [code for code, cat in label_categories.items() if cat == name]
        if not codes:
            continue
        member = np.isin(labels, codes)
        near = member | np.roll(member, 1, 0) | np.roll(member, -1, 0) | np.roll(member, 1, 1) | np.roll(member, -1, 1)
        out[boundary & near] = names.index(name)
    return out


def select_landmarks(rng: np.random.Generator, frames: np.ndarray, tform_tissue_from_image: np.ndarray,
                     labels, scale: np.ndarray, sector_mask: np.ndarray, count: int, stride: int = 1,
                     label_categories: dict | None = None):
    """Choose ``count`` landmarks on a rendered scan.

    Args:
        rng: the only source of randomness.
        frames: uint8 [N, H, W], the rendered scan (for brightness).
        tform_tissue_from_image: float64 [N, 4, 4], image mm -> tissue mm per frame.
        labels: ``labels(points [M, 3] tissue mm) -> uint8 [M]``, the phantom's tissue classes.
        scale: [4, 4] ``S``, pixel -> image mm.
        sector_mask: bool [H, W], inside the probe's sector (``ImageGeometry.sector_mask``).
        count: K.
        stride: read labels on every ``stride``-th pixel (1 at full size costs one label lookup per
            sector pixel and chosen frame; 2 quarters that); landmarks lie on that grid.
        label_categories: optional ``{label code: "bone" | "fascia" | "vessel" | "skin"}`` to draw
            boundary types with ``CATEGORY_WEIGHTS``.
    Returns:
        ``(landmarks int64 [K, 3] (frame, x, y), points float64 [K, 3] tissue mm, kinds list[str])``,
        ``kinds`` naming the category of each (``"boundary"`` where uncategorised, ``"bright"`` for the
        fallback on a frame without a visible boundary: the brightest pixel well inside the sector).
    """
    frames = np.asarray(frames)
    num_frames, height, width = frames.shape
    if sector_mask.shape != (height, width):
        raise ValueError(f"sector_mask shape {sector_mask.shape} differs from the frames' {(height, width)}")
    chosen = stratified_frames(rng, num_frames, count)
    inner = ndimage.binary_erosion(sector_mask, iterations=MIN_SECTOR_MARGIN_PX, border_value=0)
    points_mm, pixels = pixel_points_mm(height, width, np.asarray(scale, np.float64), stride)
    grid_shape = (len(range(1, height + 1, stride)), len(range(1, width + 1, stride)))
    rows, cols = pixels[:, 1] - 1, pixels[:, 0] - 1
    inner_grid = inner[rows, cols].reshape(grid_shape)
    names = list(CATEGORY_WEIGHTS)

    landmarks, tissue_points, kinds = [], [], []
    used: set = set()
    for frame_index in chosen:
        frame = frames[frame_index]
        tissue = (tform_tissue_from_image[frame_index] @ points_mm)[:3].T
        grid_labels = np.full(grid_shape[0] * grid_shape[1], 0, dtype=np.int64)
        inside = inner_grid.ravel()
        # Only pixels well inside the sector can be landmarks, and only they need a lookup.
        grid_labels[inside] = np.asarray(labels(tissue[inside]), dtype=np.int64)
        grid_labels[~inside] = -1
        grid_labels = grid_labels.reshape(grid_shape)
        boundary = label_boundaries(grid_labels) & inner_grid
        # Outside-sector neighbours (-1) make the sector edge look like a boundary; drop those pixels.
        boundary &= ndimage.binary_erosion(inner_grid, iterations=1, border_value=0)
        brightness = ndimage.uniform_filter(frame.astype(np.float32), 3)[rows, cols].reshape(grid_shape)
        lit = inner_grid & (frame[rows, cols].reshape(grid_shape) > 0)
        threshold = max(np.percentile(brightness[lit], 60), 20.0) if lit.any() else 20.0
        candidates = boundary & (brightness >= threshold)
        if not candidates.any():
            candidates = boundary & (brightness > 0)
        flat = np.flatnonzero(candidates.ravel())
        flat = np.array([k for k in flat if (int(frame_index), int(k)) not in used], dtype=np.int64)
        if flat.size:
            category = _categories(grid_labels, candidates, label_categories).ravel()[flat]
            present = sorted(set(category.tolist()) - {-1})
            if present:
                weights = np.array([CATEGORY_WEIGHTS[names[c]] for c in present])
                pick_category = present[rng.choice(len(present), p=weights / weights.sum())]
                pool = flat[category == pick_category]
                kind = names[pick_category]
            else:
                pool, kind = flat, "boundary"
            pick = int(pool[rng.integers(pool.size)])
        else:
            # No visible boundary in this plane (e.g. all muscle): the brightest pixel well inside.
            score = np.where(inner_grid, brightness, -1.0).ravel()
            for k in used:
                if k[0] == frame_index:
                    score[k[1]] = -1.0
            pick, kind = int(np.argmax(score)), "bright"
        used.add((int(frame_index), pick))
        x, y = int(pixels[pick, 0]), int(pixels[pick, 1])
        landmarks.append((int(frame_index), x, y))
        tissue_points.append(tissue[pick])
        kinds.append(kind)
    return np.array(landmarks, dtype=np.int64), np.array(tissue_points, dtype=np.float64), kinds

"""Freehand 3D reconstruction: compound a scan's frames into a voxel volume, fill its holes, export it.

What a user of freehand ultrasound ultimately wants is a volume. Given the frames of a scan and one
rigid transform per frame into a common reference frame (the ground-truth global transforms
``T_{0<-i}`` from the tracker, or a trackerless method's prediction of them), this module

1. fits a voxel grid (``fit_grid``) to every frame's ultrasound sector: axis-aligned in the reference
   frame (``"frame0"``, the default), or an oriented box along the principal axes of the swept points
   (``"obb"``, tighter for long sweeps);
2. compounds (``compound``): pixel-nearest-neighbour (PNN), every pixel of the sector mask of frame i
   sits at ``T_{0<-i} . S . [x, y, 0, 1]`` (DESIGN.md section 2) and adds its grey value to the
   nearest voxel; a voxel's value is the mean of what it received. Frames are read and processed in
   chunks, so memory is the volume's accumulators plus one chunk of frames, whatever the scan length.
   On the CPU a compiled numba loop does it (10x faster than the same arithmetic as torch tensor ops on
   2 cores), on a GPU torch's ``index_add_``; both give the same volume;
3. fills holes (``fill_holes``): a voxel no pixel reached takes the Gaussian-weighted mean of the
   sampled voxels around it (normalised convolution) only if a sampled voxel lies within
   ``radius`` voxels (Euclidean, in index units); farther regions stay empty. A separate coverage
   volume records 2 = sampled, 1 = filled, 0 = no data;
4. exports (``write_volume``) ``.mha`` / ``.nii.gz`` (any SimpleITK format) with spacing, origin and
   direction, and reads them back (``read_volume``); compares two volumes (``normalized_cross_correlation``
   in their common coverage); draws orthogonal mid-slices side by side (``plot_orthogonal_slices``);
   writes the point cloud of bright voxels (``bright_points``, ``write_point_cloud``).

Coordinate frames
-----------------
- Reference frame (the volume's physical space): where the transforms map to, by default the first
  frame's image mm: ``X`` = image column direction, ``Y`` = image row direction (depth), ``Z`` = X x Y
  (out of the image plane). It is right-handed and rigid transforms keep it so.
- Grid (ITK convention): voxel index ``(i, j, k)`` is at ``origin + direction @ (spacing * (i, j, k))``
  mm, ``direction`` [3, 3] has the grid axes as columns. Arrays are stored ``[k, j, i]`` (i fastest),
  as ``SimpleITK.GetArrayFromImage`` returns them.
- Export: the reference frame is written as the file's physical space unchanged. ITK files (``.mha``)
  and SimpleITK's NIfTI writer treat physical space as LPS; 3D Slicer therefore shows the volume with
  exact millimetres and frame 0's image plane as an axial-like slice, with image X towards patient
  Left, image Y (depth) towards Posterior and Z towards Superior. A scan has no anatomical orientation
  of its own, so no LPS/RAS relabelling is applied: distances, angles and the mm coordinates of any
  point (in frame 0's image mm) read in Slicer are the reconstruction's own.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from utils.atomic import atomic_path
from utils.errors import InputError

logger = logging.getLogger(__name__)

GRID_FITS = ("frame0", "obb")
MASK_SOURCES = ("auto", "probe", "frames", "none")
BACKENDS = ("auto", "numba", "torch")
COVERAGE_EMPTY, COVERAGE_FILLED, COVERAGE_SAMPLED = 0, 1, 2
# A grid larger than this is almost certainly a wrong spacing or a wild prediction: 500 M voxels
# already take 4 GB of accumulators.
DEFAULT_MAX_VOXELS = 500_000_000


# --------------------------------------------------------------------------------------------
# Grid
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # eq would compare arrays elementwise
class VolumeGrid:
    """A regular voxel grid in the reference frame (mm).

    Attributes:
        origin: float64 [3], centre of voxel (0, 0, 0), mm.
        spacing: float64 [3], voxel size along the i, j, k axes, mm.
        size: ``(n_i, n_j, n_k)`` voxels (ITK order); arrays are ``[n_k, n_j, n_i]``.
        direction: float64 [3, 3], a rotation whose columns are the i, j, k axes.
    """

    origin: np.ndarray
    spacing: np.ndarray
    size: tuple
    direction: np.ndarray

    def __post_init__(self):
        object.__setattr__(self, "origin", np.asarray(self.origin, dtype=np.float64).reshape(3))
        object.__setattr__(self, "spacing", np.asarray(self.spacing, dtype=np.float64).reshape(3))
        object.__setattr__(self, "direction", np.asarray(self.direction, dtype=np.float64).reshape(3, 3))
        object.__setattr__(self, "size", tuple(int(n) for n in self.size))
        if len(self.size) != 3 or min(self.size) < 1:
            raise InputError(f"grid size {self.size} must be three positive voxel counts (n_i, n_j, n_k)")
        if not np.all(self.spacing > 0) or not np.all(np.isfinite(self.spacing)):
            raise InputError(f"grid spacing {self.spacing.tolist()} mm must be positive and finite")
        if not np.all(np.isfinite(self.origin)):
            raise InputError(f"grid origin {self.origin.tolist()} must be finite")
        d = self.direction
        if np.abs(d.T @ d - np.eye(3)).max() > 1e-6 or np.linalg.det(d) < 0:
            raise InputError(f"grid direction must be a rotation (orthonormal, det +1), got\n{d}")

    @property
    def shape(self) -> tuple:
        """Array shape ``(n_k, n_j, n_i)``."""
        return self.size[::-1]

    @property
    def num_voxels(self) -> int:
        """n_i * n_j * n_k as a Python int (an int64 product wraps for absurd sizes)."""
        return math.prod(self.size)

    def index_to_mm(self) -> np.ndarray:
        """float64 [4, 4]: homogeneous voxel index ``(i, j, k, 1)`` -> reference mm."""
        out = np.eye(4)
        out[:3, :3] = self.direction * self.spacing[None, :]
        out[:3, 3] = self.origin
        return out

    def mm_to_index(self) -> np.ndarray:
        """float64 [4, 4]: reference mm -> continuous voxel index (voxel centres at integers)."""
        out = np.eye(4)
        out[:3, :3] = self.direction.T / self.spacing[:, None]
        out[:3, 3] = -out[:3, :3] @ self.origin
        return out

    def voxel_points(self, index) -> np.ndarray:
        """float64 [M, 3] mm of integer or continuous voxel indices [M, 3] ``(i, j, k)``."""
        index = np.asarray(index, dtype=np.float64).reshape(-1, 3)
        return self.origin + (index * self.spacing) @ self.direction.T

    def extent_mm(self) -> np.ndarray:
        """float64 [3]: edge lengths of the grid along its axes, voxel centre to voxel centre plus one voxel."""
        return np.asarray(self.size) * self.spacing

    def to_dict(self) -> dict:
        """JSON-able description (for run folders)."""
        return {"origin_mm": self.origin.tolist(), "spacing_mm": self.spacing.tolist(), "size_ijk": list(self.size),
                "direction": self.direction.tolist()}


def _spacing3(spacing) -> np.ndarray:
    spacing = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,)).copy()
    if not np.all(spacing > 0) or not np.all(np.isfinite(spacing)):
        raise InputError(f"spacing {spacing.tolist()} mm must be positive and finite (one value or three)")
    return spacing


def _count_text(count: float) -> str:
    """A voxel count for a message: exact with separators, or 3 digits once it has more than 15."""
    if math.isinf(count):
        return "more than 1e308"
    return f"{int(count):,}" if count < 1e15 else f"{count:.3g}"


def grid_size(extent_mm, spacing, max_voxels: int = DEFAULT_MAX_VOXELS) -> tuple:
    """``(n_i, n_j, n_k)`` voxels whose centres span ``extent_mm`` [3] at ``spacing`` [3] mm, at most ``max_voxels``.

    Counted in float64 and Python ints: with a tiny spacing the int64 product of the sizes wraps
    around (to a negative count, or to 0), which passed the limit and then failed in numpy
    ("negative dimensions") or wrote past the accumulators in the compounding loop. Raises InputError
    naming the spacing, the size and the limit.
    """
    extent = np.asarray(extent_mm, dtype=np.float64)
    spacing = np.asarray(spacing, dtype=np.float64)
    with np.errstate(over="ignore"):  # a subnormal spacing: inf cells, refused below
        cells = [float(n) for n in np.ceil(extent / spacing - 1e-9) + 1]  # inf at worst, never wraps
    count = math.prod(cells)  # exact below 2**53, far above any allowed grid; inf past 1e308
    if not count <= max_voxels:
        raise InputError(
            f"the grid would need {' x '.join(_count_text(n) for n in cells)} = {_count_text(count)} voxels at "
            f"spacing {spacing.tolist()} mm (limit {max_voxels:,}): the frames span {extent.round(1).tolist()} mm; "
            "use a larger --spacing or check the transforms"
        )
    return tuple(int(n) for n in cells)


def _obb_axes(points: np.ndarray) -> np.ndarray:
    """Principal axes [3, 3] (columns) of points [M, 3], ordered and signed to stay close to X, Y, Z."""
    centred = points - points.mean(axis=0)
    _, vectors = np.linalg.eigh(centred.T @ centred)
    axes = np.zeros((3, 3))
    free = [0, 1, 2]
    # Greedy: give each reference axis the principal axis most parallel to it, so a sweep that is
    # nearly aligned with frame 0 gets a grid nearly aligned with frame 0 (and slices look like frames).
    for axis in range(3):
        best = max(free, key=lambda c: abs(vectors[axis, c]))
        free.remove(best)
        vector = vectors[:, best]
        axes[:, axis] = vector if vector[axis] >= 0 else -vector
    if np.linalg.det(axes) < 0:
        axes[:, 2] = -axes[:, 2]
    return axes


def fit_grid(transforms, outline_mm, spacing=0.5, fit: str = "frame0", margin_mm: float = 0.0,
             max_voxels: int = DEFAULT_MAX_VOXELS) -> VolumeGrid:
    """The grid that holds every frame's sector.

    Args:
        transforms: float [N, 4, 4] frame image mm -> reference mm (``frames_to_reference``), or a list
            of such arrays (e.g. ground truth and prediction, so both volumes share one grid).
        outline_mm: float [3, P] or [4, P] points in image mm whose convex hull holds the sector (e.g.
            ``mask_outline_mm``); a convex outline under a rigid map bounds every sector pixel.
        spacing: voxel size in mm, one value or (s_i, s_j, s_k).
        fit: ``"frame0"``: axes of the reference frame; ``"obb"``: principal axes of the swept outline
            points (an oriented bounding box, not the minimal one).
        margin_mm: added on every side.
        max_voxels: refuse larger grids (``grid_size``: InputError naming the size and the spacing).
    Returns:
        ``VolumeGrid`` whose voxel centres lie within half a voxel of every outline point.
    """
    if fit not in GRID_FITS:
        raise InputError(f"grid fit {fit!r} is not one of {list(GRID_FITS)}")
    spacing = _spacing3(spacing)
    sets = transforms if isinstance(transforms, (list, tuple)) else [transforms]
    outline = np.asarray(outline_mm, dtype=np.float64)
    outline = np.concatenate([outline[:3], np.ones((1, outline.shape[1]))])
    points = np.concatenate([(np.asarray(t, dtype=np.float64) @ outline)[:, :3].transpose(0, 2, 1).reshape(-1, 3)
                             for t in sets])
    if not np.all(np.isfinite(points)):
        raise InputError("fit_grid: the transforms move the sector to non-finite positions")
    axes = np.eye(3) if fit == "frame0" else _obb_axes(points)
    local = points @ axes  # coordinates along the grid axes
    low = local.min(axis=0) - margin_mm
    high = local.max(axis=0) + margin_mm
    size = grid_size(high - low, spacing, max_voxels)
    # Centre the voxel centres on the extent, so the half-voxel slack is even on both sides.
    low = low - ((np.array(size) - 1) * spacing - (high - low)) / 2
    return VolumeGrid(axes @ low, spacing, size, axes)


# --------------------------------------------------------------------------------------------
# Transforms and masks
# --------------------------------------------------------------------------------------------


def frames_to_reference(global_transforms, num_frames: int) -> np.ndarray:
    """float64 [N, 4, 4] image mm of frame i -> reference mm, for every frame.

    Args:
        global_transforms: [N-1, 4, 4] ``T_{0<-i}`` for i = 1..N-1 (the challenge's global transforms,
            ``utils.transform.global_transforms`` or a prediction; frame 0 gets the identity), or
            [N, 4, 4] one per frame into any common reference frame. numpy or torch, any float dtype.
        num_frames: N, to check the count against.
    Raises ValueError naming the shapes when they do not fit, or for non-finite values.
    """
    if isinstance(global_transforms, torch.Tensor):
        global_transforms = global_transforms.detach().cpu().numpy()
    tforms = np.asarray(global_transforms, dtype=np.float64)
    if tforms.ndim != 3 or tforms.shape[1:] != (4, 4):
        raise InputError(f"global transforms must be [N-1, 4, 4] or [N, 4, 4], got shape {tforms.shape}")
    if tforms.shape[0] == num_frames - 1:
        tforms = np.concatenate([np.eye(4)[None], tforms])
    elif tforms.shape[0] != num_frames:
        raise InputError(
            f"{tforms.shape[0]} transforms for a scan of {num_frames} frames: expected {num_frames - 1} "
            f"(T_0<-i, i = 1..N-1) or {num_frames} (one per frame)"
        )
    if not np.all(np.isfinite(tforms)):
        bad = int(np.flatnonzero(~np.isfinite(tforms).all(axis=(1, 2)))[0])
        raise InputError(f"global transforms: frame {bad} has non-finite values")
    return tforms


def probe_sector_mask(height: int, width: int, pixel_mm) -> np.ndarray:
    """bool [H, W]: the simulator's curvilinear probe sector (``simulation.probe``) for this frame size.

    ``pixel_mm`` is ``(s_x, s_y)``, the calibration's ``S`` diagonal. Right for simulated scans; real
    probes have other sectors: use ``mask_from_frames`` for them.
    """
    from simulation.probe import CurvilinearProbe, ImageGeometry

    geometry = ImageGeometry(CurvilinearProbe(), int(height), int(width), (float(pixel_mm[0]), float(pixel_mm[1])))
    return geometry.sector_mask()


def mask_from_frames(frames, threshold: int = 0, chunk: int = 64, open_px: int = 1, erode_px: int = 1) -> np.ndarray:
    """bool [H, W]: where the ultrasound field is, from the frames themselves.

    A pixel belongs to the field if it is above ``threshold`` in at least one frame; the union is then
    cleaned: its largest connected region is kept, its holes are filled, thin lines (text, markers)
    thinner than ``2 * open_px + 1`` pixels are opened away, and ``erode_px`` pixels are taken off the
    rim (scan conversion blurs the sector's edge into black). Regions that are black in every frame
    (deep anechoic areas touching the rim, below the arm in simulated scans) are left out: they have
    no sample to give. ``frames`` is anything ``read_frame_chunks`` reads.
    """
    from scipy import ndimage

    union = None
    for _, block in read_frame_chunks(frames, chunk):
        hit = (np.asarray(block) > threshold).any(axis=0)
        union = hit if union is None else union | hit
    if union is None:
        raise InputError("mask_from_frames: the scan has no frames")
    if open_px > 0:
        union = ndimage.binary_opening(union, structure=np.ones((3, 3), bool), iterations=open_px)
    labels, count = ndimage.label(union)
    if count == 0:
        raise InputError(f"mask_from_frames: every pixel of every frame is <= {threshold}: no ultrasound field")
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    mask = ndimage.binary_fill_holes(labels == int(np.argmax(sizes)))
    if erode_px > 0:
        mask = ndimage.binary_erosion(mask, iterations=erode_px, border_value=0)
    return mask


def mask_outline_mm(mask: np.ndarray, scale) -> np.ndarray:
    """float64 [4, P]: homogeneous image-mm points whose convex hull contains every mask pixel.

    The vertices of the convex hull of the mask's pixel centres (pixels from 1, ``S @ [x, y, 0, 1]``),
    a few dozen points instead of every pixel, for ``fit_grid``.
    """
    ys, xs = np.nonzero(np.asarray(mask, dtype=bool))
    if xs.size == 0:
        raise InputError("the sector mask is empty: no pixel to reconstruct")
    points = np.unique(np.stack([xs, ys], axis=1), axis=0).astype(np.float64) + 1.0
    if len(points) >= 3:
        from scipy.spatial import ConvexHull, QhullError

        try:
            points = points[ConvexHull(points).vertices]
        except QhullError:  # collinear pixels (a one-pixel-wide mask): keep them all
            pass
    scale = np.asarray(scale, dtype=np.float64)
    pixels = np.stack([points[:, 0], points[:, 1], np.zeros(len(points)), np.ones(len(points))])
    return scale @ pixels


def mask_runs(mask: np.ndarray):
    """Row runs of a mask: int32 arrays ``(rows, starts, ends)``, 0-based, ``ends`` exclusive."""
    mask = np.asarray(mask, dtype=bool)
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    rows, cols = np.nonzero(np.diff(padded, axis=1))
    # Edges alternate start, end along each row, and np.nonzero lists them row by row.
    return rows[0::2].astype(np.int32), cols[0::2].astype(np.int32), cols[1::2].astype(np.int32)


# --------------------------------------------------------------------------------------------
# Reading frames in chunks
# --------------------------------------------------------------------------------------------


def num_frames_of(frames) -> int:
    """N of a frame source: a ``ScanFile`` (``num_frames``) or an array-like [N, H, W]."""
    if hasattr(frames, "num_frames"):
        return int(frames.num_frames)
    return int(frames.shape[0])


def frame_size_of(frames) -> tuple:
    """(H, W) of a frame source."""
    if hasattr(frames, "frame_size"):
        return tuple(int(v) for v in frames.frame_size)
    return int(frames.shape[1]), int(frames.shape[2])


def read_frame_chunks(frames, chunk: int):
    """Yield ``(start, frames[start:start + chunk])`` as numpy arrays.

    ``frames`` is a ``utils.challenge_data.ScanFile`` (read from disk chunk by chunk: bounded memory),
    an h5py dataset, a numpy array or a torch tensor [N, H, W].
    """
    if chunk < 1:
        raise InputError(f"chunk={chunk}: expected at least one frame per chunk")
    total = num_frames_of(frames)
    for start in range(0, total, chunk):
        stop = min(total, start + chunk)
        if hasattr(frames, "read_frames"):
            block = frames.read_frames(range(start, stop))
        else:
            block = frames[start:stop]
        if isinstance(block, torch.Tensor):
            block = block.cpu().numpy()
        yield start, np.asarray(block)


# --------------------------------------------------------------------------------------------
# Compounding
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Volume:
    """A reconstructed volume.

    Attributes:
        values: float32 numpy [n_k, n_j, n_i], mean grey value per voxel (0 where coverage is 0).
        coverage: uint8 numpy [n_k, n_j, n_i]: 2 = reached by pixels, 1 = filled from neighbours,
            0 = no data.
        grid: where the voxels are.
    """

    values: np.ndarray
    coverage: np.ndarray
    grid: VolumeGrid

    def covered(self) -> np.ndarray:
        """bool [n_k, n_j, n_i]: voxels with a value (sampled or filled)."""
        return self.coverage > COVERAGE_EMPTY


def _accumulate(frames, rows, starts, ends, affine, size_i, size_j, size_k, sums, counts):  # pragma: no cover (numba)
    """The PNN loop, compiled by ``_numba_kernel``; see ``compound`` for the arguments.

    ``affine[f]`` maps 1-based ``(x, y, 1)`` to the continuous voxel index + 0.5, so that truncating a
    non-negative value gives the nearest voxel; the row term is evaluated once per run of the mask.
    """
    for f in range(frames.shape[0]):
        a00, a01, a02 = affine[f, 0, 0], affine[f, 0, 1], affine[f, 0, 2]
        a10, a11, a12 = affine[f, 1, 0], affine[f, 1, 1], affine[f, 1, 2]
        a20, a21, a22 = affine[f, 2, 0], affine[f, 2, 1], affine[f, 2, 2]
        for r in range(rows.size):
            y = rows[r]
            row_i = a01 * (y + 1.0) + a02
            row_j = a11 * (y + 1.0) + a12
            row_k = a21 * (y + 1.0) + a22
            for x in range(starts[r], ends[r]):
                fi = a00 * (x + 1.0) + row_i
                fj = a10 * (x + 1.0) + row_j
                fk = a20 * (x + 1.0) + row_k
                # written so that NaN fails every test
                if fi >= 0.0 and fi < size_i and fj >= 0.0 and fj < size_j and fk >= 0.0 and fk < size_k:
                    q = (np.int64(fk) * size_j + np.int64(fj)) * size_i + np.int64(fi)
                    sums[q] += frames[f, y, x]
                    counts[q] += 1


_NUMBA_KERNEL = None


def _numba_kernel():
    """``_accumulate`` compiled (on first use, cached on disk: nothing is compiled at import)."""
    global _NUMBA_KERNEL
    if _NUMBA_KERNEL is None:
        import numba

        _NUMBA_KERNEL = numba.njit(cache=True, nogil=True)(_accumulate)
    return _NUMBA_KERNEL


def _pixel_to_index_affines(to_reference: np.ndarray, scale: np.ndarray, grid: VolumeGrid) -> np.ndarray:
    """float64 [n, 3, 3]: (x, y, 1) pixel (from 1) -> continuous voxel index + 0.5, per frame."""
    full = grid.mm_to_index() @ to_reference @ np.asarray(scale, dtype=np.float64)  # [n, 4, 4]
    # The pixel's z is 0: drop column 2 and keep (x, y, translation).
    affine = full[:, :3][:, :, [0, 1, 3]].copy()
    affine[:, :, 2] += 0.5
    return affine


def resolve_backend(backend: str, device) -> str:
    """``"numba"`` or ``"torch"``: ``auto`` is numba on the CPU, torch on other devices."""
    if backend not in BACKENDS:
        raise InputError(f"backend {backend!r} is not one of {list(BACKENDS)}")
    device = torch.device(device)
    if backend == "auto":
        return "numba" if device.type == "cpu" else "torch"
    if backend == "numba" and device.type != "cpu":
        raise InputError(f"backend 'numba' runs on the CPU only, got device {device}")
    return backend


def compound(frames, global_transforms, scale, grid: VolumeGrid, mask=None, *, chunk: int = 64, device="cpu",
             backend: str = "auto", threads: int | None = None, progress: bool = False):
    """Pixel-nearest-neighbour compounding: per-voxel sums and counts of the frames' sector pixels.

    Args:
        frames: uint8 [N, H, W] source (``ScanFile``, h5py dataset, numpy, torch; see ``read_frame_chunks``).
        global_transforms: ``T_{0<-i}`` [N-1, 4, 4] or [N, 4, 4] (``frames_to_reference``).
        scale: ``S`` [4, 4], pixel -> image mm.
        grid: the voxel grid (``fit_grid``); pixels that fall outside it are dropped.
        mask: bool [H, W] pixels to use (the ultrasound sector), None for all.
        chunk: frames read at a time (memory: chunk x H x W bytes; the torch backend then works on
            ~4 M pixels at a time, ~150 MB of temporaries).
        device: where the accumulators live (torch backend; numba is CPU only).
        backend: ``"auto"`` (numba on CPU, torch elsewhere), ``"numba"`` or ``"torch"``.
        threads: CPU threads for the numba backend (default ``torch.get_num_threads()``); each thread
            beyond the first adds its own accumulators (8 bytes per voxel).
        progress: show a tqdm bar (only when attached to a terminal).
    Returns:
        ``(sums, counts)``: float32 and int32 torch tensors [n_k, n_j, n_i] on ``device``. Sums of uint8
        values are exact while a voxel receives fewer than 2^24 / 255 = 65793 pixels.
    """
    num = num_frames_of(frames)
    height, width = frame_size_of(frames)
    to_reference = frames_to_reference(global_transforms, num)
    mask = np.ones((height, width), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if mask.shape != (height, width):
        raise InputError(f"sector mask has shape {mask.shape}, frames are {(height, width)}")
    backend = resolve_backend(backend, device)
    affines = _pixel_to_index_affines(to_reference, scale, grid)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=num, unit="frame", desc="compound", disable=None, dynamic_ncols=True)
    try:
        if backend == "numba":
            sums, counts = _compound_numba(frames, affines, mask, grid, chunk, threads, bar)
            return torch.from_numpy(sums).reshape(grid.shape), torch.from_numpy(counts).reshape(grid.shape)
        return _compound_torch(frames, affines, mask, grid, chunk, torch.device(device), bar)
    finally:
        if bar is not None:
            bar.close()


def _compound_numba(frames, affines, mask, grid, chunk, threads, bar):
    from concurrent.futures import ThreadPoolExecutor

    kernel = _numba_kernel()
    rows, starts, ends = mask_runs(mask)
    threads = max(1, int(threads or torch.get_num_threads()))
    size_i, size_j, size_k = grid.size
    accumulators = [(np.zeros(grid.num_voxels, np.float32), np.zeros(grid.num_voxels, np.int32))
                    for _ in range(threads)]

    def work(part, block, affine):
        if len(block):
            kernel(block, rows, starts, ends, affine, size_i, size_j, size_k, *accumulators[part])

    # Python threads run the kernel in parallel (it releases the GIL); each has its own accumulators,
    # so no two threads ever add into the same voxel array.
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for start, block in read_frame_chunks(frames, chunk):
            block = np.ascontiguousarray(block)
            if block.dtype != np.uint8:
                block = block.astype(np.float32)
            affine = affines[start:start + len(block)]
            bounds = np.linspace(0, len(block), threads + 1).astype(int)
            jobs = [pool.submit(work, t, block[bounds[t]:bounds[t + 1]], affine[bounds[t]:bounds[t + 1]])
                    for t in range(threads)]
            for job in jobs:
                job.result()
            if bar is not None:
                bar.update(len(block))
    sums, counts = accumulators[0]
    for extra_sums, extra_counts in accumulators[1:]:
        sums += extra_sums
        counts += extra_counts
    return sums, counts


_TORCH_PIXELS_PER_STEP = 4_000_000


def _compound_torch(frames, affines, mask, grid, chunk, device, bar):
    size = torch.tensor(grid.size, dtype=torch.float32, device=device).view(1, 3, 1)
    size_i, size_j, _ = grid.size
    mask_t = torch.from_numpy(mask).to(device)
    ys, xs = np.nonzero(mask)
    # float64 coordinates on the CPU so that the voxel choice matches the numba loop's to the last bit
    # but for exact ties; float32 on GPUs (a few thousand voxels per axis leave ~1e-4 voxel of precision).
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    pixels = torch.from_numpy(np.stack([xs + 1.0, ys + 1.0, np.ones(xs.size)])).to(device, dtype)
    sums = torch.zeros(grid.num_voxels + 1, dtype=torch.float32, device=device)  # last entry: outside
    counts = torch.zeros(grid.num_voxels + 1, dtype=torch.int32, device=device)
    outside = grid.num_voxels
    # Frames per step: ~4 M pixel coordinates (~100 MB of float64 index temporaries) at a time.
    step = max(1, _TORCH_PIXELS_PER_STEP // max(1, pixels.shape[1]))
    for start, block in read_frame_chunks(frames, chunk):
        block = torch.from_numpy(np.ascontiguousarray(block)).to(device)
        for first in range(0, len(block), step):
            part = block[first:first + step]
            affine = torch.from_numpy(affines[start + first:start + first + len(part)]).to(device, dtype)
            index = torch.floor(affine @ pixels)  # [n, 3, P]
            inside = ((index >= 0) & (index < size.to(dtype))).all(dim=1)
            index = index.long()
            flat = (index[:, 2] * size_j + index[:, 1]) * size_i + index[:, 0]
            flat = torch.where(inside, flat, torch.full_like(flat, outside)).reshape(-1)
            values = part[:, mask_t].float().reshape(-1)
            sums.index_add_(0, flat, values)
            counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        if bar is not None:
            bar.update(len(block))
    return sums[:-1].reshape(grid.shape), counts[:-1].reshape(grid.shape)


# --------------------------------------------------------------------------------------------
# Hole filling
# --------------------------------------------------------------------------------------------


def _min_plus(x: torch.Tensor, axis: int, reach: int) -> torch.Tensor:
    """``min_{|d| <= reach} x[n + d] + d^2`` along ``axis``: one separable pass of a squared distance."""
    out = x.clone()
    length = x.shape[axis]
    for d in range(1, min(reach, length - 1) + 1):
        raised = x + d * d  # always from the pass's input x, never from out (that would chain offsets)
        for target, source in ((out.narrow(axis, 0, length - d), raised.narrow(axis, d, length - d)),
                               (out.narrow(axis, d, length - d), raised.narrow(axis, 0, length - d))):
            torch.minimum(target, source, out=target)
    return out


def _gauss_pass(x: torch.Tensor, axis: int, weights) -> torch.Tensor:
    """Separable pass of a symmetric kernel ``weights[|d|]``, zeros outside."""
    out = x * weights[0]
    length = x.shape[axis]
    for d in range(1, min(len(weights) - 1, length - 1) + 1):
        out.narrow(axis, 0, length - d).add_(x.narrow(axis, d, length - d), alpha=weights[d])
        out.narrow(axis, d, length - d).add_(x.narrow(axis, 0, length - d), alpha=weights[d])
    return out


def fill_holes(values, sampled, radius: float = 2.0, sigma: float | None = None, slab: int = 32):
    """Fill unsampled voxels near sampled ones by normalised convolution; leave the others empty.

    Args:
        values: float [n_k, n_j, n_i] (numpy or torch), meaningful where ``sampled``.
        sampled: bool [n_k, n_j, n_i], voxels that received pixels.
        radius: in voxels (index units). A voxel is filled iff a sampled voxel lies within this
            Euclidean distance; 0 disables filling.
        sigma: Gaussian weight width in voxels (default ``radius / 2``, at least 0.5): a filled voxel
            takes ``sum_s w_s v_s / sum_s w_s`` over the sampled voxels s in the cube of half-width
            ``floor(radius)`` around it, ``w_s = exp(-|d_s|^2 / 2 sigma^2)``, so the nearest samples
            dominate (it tends to nearest-neighbour filling as sigma shrinks).
        slab: planes along k processed at a time (memory: ~10 float32 copies of a slab plus its halo).
    Returns:
        ``(filled_values, filled)``: float32 torch tensor with sampled voxels unchanged and filled
        voxels set (others 0), and bool torch tensor of the voxels that were filled (not sampled).

    Both the distance test and the weights are separable (the truncated squared distance transform
    is a min-plus convolution with ``d_i^2 + d_j^2 + d_k^2``; the Gaussian is a product), so the
    cost is 3 x (2 floor(radius) + 1) shifted passes per quantity, and the distance is exact.
    """
    values = torch.as_tensor(values)
    sampled = torch.as_tensor(sampled, device=values.device).bool()
    if values.shape != sampled.shape or values.dim() != 3:
        raise InputError(f"values {tuple(values.shape)} and sampled {tuple(sampled.shape)} must be the same 3-D shape")
    values = values.float()
    if radius < 0:
        raise InputError(f"fill radius {radius} must be >= 0 voxels")
    reach = int(math.floor(radius))
    if reach < 1:
        return torch.where(sampled, values, torch.zeros_like(values)), torch.zeros_like(sampled)
    sigma = max(0.5, radius / 2) if sigma is None else float(sigma)
    weights = [math.exp(-d * d / (2 * sigma * sigma)) for d in range(reach + 1)]
    out = torch.where(sampled, values, torch.zeros_like(values))
    filled = torch.zeros_like(sampled)
    depth = values.shape[0]
    slab = max(1, int(slab))
    for start in range(0, depth, slab):
        stop = min(depth, start + slab)
        lo, hi = max(0, start - reach), min(depth, stop + reach)
        seen = sampled[lo:hi].any(dim=0)  # [n_j, n_i]
        if not bool(seen.any()):
            continue
        # Work on the box around this slab's samples (plus the reach): the rest cannot be filled.
        rows = torch.nonzero(seen.any(dim=1)).flatten()
        cols = torch.nonzero(seen.any(dim=0)).flatten()
        j0, j1 = max(0, int(rows[0]) - reach), min(seen.shape[0], int(rows[-1]) + reach + 1)
        i0, i1 = max(0, int(cols[0]) - reach), min(seen.shape[1], int(cols[-1]) + reach + 1)
        hit = sampled[lo:hi, j0:j1, i0:i1]
        weight = hit.float()
        number = torch.where(hit, values[lo:hi, j0:j1, i0:i1], torch.zeros_like(weight))
        distance = torch.where(hit, torch.zeros_like(weight), torch.full_like(weight, math.inf))
        for axis in (2, 1, 0):
            distance = _min_plus(distance, axis, reach)
            weight = _gauss_pass(weight, axis, weights)
            number = _gauss_pass(number, axis, weights)
        inner = slice(start - lo, start - lo + (stop - start))
        fill = (~hit[inner]) & (distance[inner] <= radius * radius) & (weight[inner] > 0)
        fill_values = number[inner] / weight[inner].clamp_min(1e-30)
        box = out[start:stop, j0:j1, i0:i1]
        box.copy_(torch.where(fill, fill_values, box))
        filled[start:stop, j0:j1, i0:i1] = fill
    return out, filled


# --------------------------------------------------------------------------------------------
# The whole reconstruction
# --------------------------------------------------------------------------------------------


def volume_from_accumulators(sums, counts, grid: VolumeGrid, fill_radius: float = 2.0,
                             sigma: float | None = None) -> Volume:
    """Mean per voxel, holes filled within ``fill_radius`` voxels; numpy ``Volume``."""
    counts = torch.as_tensor(counts)
    sampled = counts > 0
    mean = torch.as_tensor(sums).float() / counts.clamp_min(1).float()
    values, filled = fill_holes(mean, sampled, radius=fill_radius, sigma=sigma)
    coverage = sampled.to(torch.uint8) * COVERAGE_SAMPLED + filled.to(torch.uint8) * COVERAGE_FILLED
    return Volume(values.cpu().numpy(), coverage.cpu().numpy(), grid)


def reconstruct(frames, global_transforms, scale, *, spacing=0.5, mask=None, grid: VolumeGrid | None = None,
                fit: str = "frame0", margin_mm: float = 0.0, fill_radius: float = 2.0, sigma: float | None = None,
                chunk: int = 64, device="cpu", backend: str = "auto", threads: int | None = None,
                progress: bool = False) -> Volume:
    """Frames + global transforms -> ``Volume`` (compounded, holes filled).

    Args as ``compound`` and ``fill_holes``; ``grid`` None fits one to this scan's sector
    (``fit_grid`` with ``spacing``, ``fit``, ``margin_mm``). Pass a shared grid to compare volumes.
    """
    num = num_frames_of(frames)
    height, width = frame_size_of(frames)
    if mask is None:
        mask = np.ones((height, width), dtype=bool)
    if grid is None:
        grid = fit_grid(frames_to_reference(global_transforms, num), mask_outline_mm(mask, scale), spacing, fit,
                        margin_mm)
    sums, counts = compound(frames, global_transforms, scale, grid, mask, chunk=chunk, device=device, backend=backend,
                            threads=threads, progress=progress)
    return volume_from_accumulators(sums, counts, grid, fill_radius, sigma)


# --------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------


def normalized_cross_correlation(a, b, mask=None) -> float:
    """Pearson correlation of two volumes over ``mask`` (all voxels if None): 1 = identical up to gain.

    Returns NaN when the mask is empty or either volume is constant on it.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise InputError(f"volumes of shapes {a.shape} and {b.shape} are not on one grid")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        a, b = a[mask], b[mask]
    a = a.ravel() - a.mean() if a.size else a.ravel()
    b = b.ravel() - b.mean() if b.size else b.ravel()
    denominator = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denominator if denominator > 0 else float("nan")


def compare_volumes(reference: Volume, other: Volume) -> dict:
    """NCC in the common coverage and coverage figures of two volumes on one grid."""
    if reference.values.shape != other.values.shape:
        raise InputError("compare_volumes: the volumes must share one grid (pass grid= to reconstruct)")
    both = reference.covered() & other.covered()
    either = reference.covered() | other.covered()
    return {
        "ncc": normalized_cross_correlation(reference.values, other.values, both),
        "overlap_voxels": int(both.sum()),
        "overlap_fraction": float(both.sum() / max(1, either.sum())),  # intersection over union of coverage
        "mean_abs_difference": (float(np.abs(reference.values[both] - other.values[both]).mean())
                                if both.any() else float("nan")),
    }


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def _image_suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr"):
        if name.endswith(suffix):
            return suffix
    raise InputError(f"{path}: unknown volume format; use one of .mha, .nii.gz, .nii, .nrrd")


def write_volume(path, array, grid: VolumeGrid, compress: bool = True) -> Path:
    """Write ``array`` [n_k, n_j, n_i] on ``grid`` with SimpleITK (atomically); returns the path.

    Spacing, origin and direction are the grid's (module docstring: the reference frame is written as
    the physical space). The array's dtype is kept (uint8 for grey values and coverage, float32 for means).
    """
    import SimpleITK as sitk

    path = Path(path)
    suffix = _image_suffix(path)
    array = np.ascontiguousarray(array)
    if array.shape != grid.shape:
        raise InputError(f"array shape {array.shape} does not match the grid's {grid.shape} (n_k, n_j, n_i)")
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(v) for v in grid.spacing])
    image.SetOrigin([float(v) for v in grid.origin])
    image.SetDirection([float(v) for v in grid.direction.ravel()])  # row-major, columns = axes
    with atomic_path(path, suffix=suffix) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=compress)
    return path


def read_volume(path):
    """``(array [n_k, n_j, n_i], VolumeGrid)`` of a volume file written by ``write_volume`` (or any 3-D image)."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"volume file not found: {path}")
    image = sitk.ReadImage(str(path))
    if image.GetDimension() != 3:
        raise InputError(f"{path}: expected a 3-D image, got {image.GetDimension()}-D")
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    grid = VolumeGrid(np.array(image.GetOrigin()), np.array(image.GetSpacing()), image.GetSize(), direction)
    return sitk.GetArrayFromImage(image), grid


def to_uint8(values) -> np.ndarray:
    """Grey values rounded and clipped to uint8 (what the frames hold)."""
    return np.clip(np.rint(np.asarray(values)), 0, 255).astype(np.uint8)


def bright_points(volume: Volume, threshold: float, max_points: int | None = None, seed: int = 0):
    """``(points [P, 3] mm, values [P])`` of covered voxels at or above ``threshold``.

    Points are voxel centres in the reference frame; ``max_points`` keeps a uniform random subset.
    """
    index = np.argwhere(volume.covered() & (volume.values >= threshold))  # [P, 3] as (k, j, i)
    if max_points is not None and len(index) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(index), max_points, replace=False))
        index = index[keep]
    values = volume.values[tuple(index.T)] if len(index) else np.zeros(0, np.float32)
    return volume.grid.voxel_points(index[:, ::-1]), values


def write_point_cloud(path, points, values=None, value_name: str = "intensity") -> Path:
    """Write points [P, 3] (mm) and optional values [P] as a binary little-endian PLY (atomically).

    PLY opens in 3D Slicer (as a model), ParaView, MeshLab and CloudCompare; the coordinates are those
    of the volume's physical space (``write_volume``).
    """
    path = Path(path)
    points = np.asarray(points, dtype=np.float32).reshape(-1, 3)
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {len(points)}",
              "property float x", "property float y", "property float z"]
    if values is not None:
        fields.append((value_name, "<f4"))
        header.append(f"property float {value_name}")
    header.append("end_header")
    data = np.empty(len(points), dtype=fields)
    data["x"], data["y"], data["z"] = points[:, 0], points[:, 1], points[:, 2]
    if values is not None:
        data[value_name] = np.asarray(values, dtype=np.float32).reshape(-1)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(("\n".join(header) + "\n").encode("ascii"))
            handle.write(data.tobytes())
    return path


# --------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------


def _slice(volume: Volume, axis: int, index: int):
    values = np.take(volume.values, index, axis=axis)
    covered = np.take(volume.covered(), index, axis=axis)
    return np.ma.masked_array(values, ~covered)


def plot_orthogonal_slices(volumes: dict, path, title: str = "", centre=None, vmax: float = 255.0) -> Path:
    """PNG of three orthogonal slices through each volume, one row per volume, same grid for all.

    Args:
        volumes: ``{label: Volume}``; all on the grid of the first (their slices are then comparable).
        path: PNG to write.
        centre: voxel ``(i, j, k)`` the slices pass through; default the centre of the first volume's
            covered voxels' bounding box.
    Columns: the k-plane (i across, j down: an image-like view, depth downwards), the j-plane
    (i across, k down) and the i-plane (k across, j down), with mm axes. Voxels without data show in
    dark blue, so "no data" is not mistaken for black tissue.
    """
    from matplotlib import colormaps

    from utils.plotting import plt  # its import selects the Agg backend (files only)

    items = list(volumes.items())
    if not items:
        raise InputError("plot_orthogonal_slices: no volumes")
    grid = items[0][1].grid
    for label, volume in items[1:]:
        if volume.values.shape != grid.shape:
            raise InputError(f"volume {label!r} is not on the first volume's grid")
    if centre is None:
        covered = np.argwhere(items[0][1].covered())
        if len(covered) == 0:
            centre = [n // 2 for n in grid.size]
        else:
            k, j, i = ((covered.min(axis=0) + covered.max(axis=0)) // 2).tolist()
            centre = [i, j, k]
    i0, j0, k0 = (int(v) for v in centre)
    ext = [(0.0, n * s) for n, s in zip(grid.size, grid.spacing)]  # mm along i, j, k from the first voxel's edge
    cmap = colormaps["gray"].with_extremes(bad=(0.05, 0.08, 0.25))
    planes = [  # (array axis, index, grid axis across, grid axis down, transpose, name)
        (0, k0, 0, 1, False, f"k = {k0}"),
        (1, j0, 0, 2, False, f"j = {j0}"),
        (2, i0, 2, 1, True, f"i = {i0}"),
    ]
    widths = [ext[p[2]][1] for p in planes]
    heights = [ext[p[3]][1] for p in planes]
    fig_width = 13.0
    row_height = fig_width * max(heights) / sum(widths) + 0.6
    fig, axes = plt.subplots(len(items), 3, figsize=(fig_width, row_height * len(items) + 0.5), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    names = "ijk"
    for row, (label, volume) in enumerate(items):
        for col, (axis, index, x_axis, y_axis, transpose, plane_name) in enumerate(planes):
            image = _slice(volume, axis, index)
            if transpose:
                image = image.T
            ax = axes[row, col]
            ax.imshow(image, cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest", origin="upper",
                      extent=(ext[x_axis][0], ext[x_axis][1], ext[y_axis][1], ext[y_axis][0]))
            ax.set_xlabel(f"{names[x_axis]} (mm)")
            ax.set_ylabel(f"{names[y_axis]} (mm)")
            ax.set_title(f"{label}: {plane_name}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# Transforms from a file (any method's prediction)
# --------------------------------------------------------------------------------------------

TRANSFORM_KEYS = ("global_transforms", "global", "transforms")
_EXPECTED_ARRAY = "expected a .npy array of [N-1, 4, 4] or [N, 4, 4] transforms (numpy.save)"
_EXPECTED_HDF5 = ("a 'global_transforms' float [N-1, 4, 4] or [N, 4, 4] dataset, or 'tforms' [N, 4, 4] "
                  "tracker poses")


def check_rigid(transforms, source, first_row: int = 0) -> None:
    """Raise InputError unless every transform [N, 4, 4] (frame i at index i) is rigid.

    Rigid as the tracker poses the dataset readers accept (``utils.challenge_data.validate_tforms``,
    same tolerances, computed in float64): last row ``[0, 0, 0, 1]`` within
    ``POSE_LAST_ROW_TOLERANCE``, ``max |R^T R - I| <= POSE_ORTHONORMAL_TOLERANCE`` and ``det R > 0``.
    A scaled, sheared or mirrored "pose" would reconstruct a distorted volume with no other sign of
    trouble. ``first_row`` is the frame of the file's first row (1 for [N-1, 4, 4] ``T_{0<-i}``),
    so the message names the frame and the file's row. Values are assumed finite
    (``frames_to_reference`` refuses the others).
    """
    from utils.challenge_data import POSE_LAST_ROW_TOLERANCE, POSE_ORTHONORMAL_TOLERANCE

    tforms = np.asarray(transforms, dtype=np.float64)

    def first_bad(bad: np.ndarray) -> tuple[int, str]:
        frame = int(bad[0])
        return frame, (f"{source}: the transform of frame {frame} (row {frame - first_row} of the file; "
                       f"{bad.size} of {len(tforms)} frames bad)")

    row_error = np.abs(tforms[:, 3] - [0.0, 0.0, 0.0, 1.0]).max(axis=1)
    bad = np.flatnonzero(row_error > POSE_LAST_ROW_TOLERANCE)
    if bad.size:
        frame, where = first_bad(bad)
        raise InputError(f"{where} has last row {tforms[frame, 3].tolist()} (off by {row_error[frame]:.3g} > "
                         f"{POSE_LAST_ROW_TOLERANCE:g}), expected [0, 0, 0, 1]: not a rigid transform")
    rotation = tforms[:, :3, :3]
    deviation = np.abs(np.swapaxes(rotation, 1, 2) @ rotation - np.eye(3)).max(axis=(1, 2))
    bad = np.flatnonzero(deviation > POSE_ORTHONORMAL_TOLERANCE)
    if bad.size:
        frame, where = first_bad(bad)
        # A free 12-value 'transform' prediction is not orthonormal: it must be projected first.
        raise InputError(f"{where} is not rigid: max |R^T R - I| = {deviation[frame]:.3g} > "
                         f"{POSE_ORTHONORMAL_TOLERANCE:g} (a scaled or sheared rotation)")
    determinant = np.linalg.det(rotation)
    bad = np.flatnonzero(determinant <= 0)
    if bad.size:
        frame, where = first_bad(bad)
        raise InputError(f"{where} has a rotation with det = {determinant[frame]:.6g}, expected +1 "
                         "(a reflection is not a pose)")


def _load_npy(path: Path) -> np.ndarray:
    """The array of a ``.npy`` file; InputError naming the file when it is not one.

    numpy reads a file without the ``.npy`` header as a pickle and, with pickles refused, says only
    that (naming no file); a ``.npz`` under a ``.npy`` name would load as an archive, not an array.
    """
    with open(path, "rb") as handle:
        magic = handle.read(6)
    if magic != b"\x93NUMPY":
        raise InputError(f"{path}: not a .npy file (no .npy header, {path.stat().st_size} bytes); {_EXPECTED_ARRAY}")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, EOFError) as error:  # truncated, or an object array
        raise InputError(f"{path}: unreadable .npy file ({error}); {_EXPECTED_ARRAY}") from None


def _read_hdf5_transforms(path: Path) -> tuple[np.ndarray, bool]:
    """``(array, is_tracker)`` from a ``.h5`` transforms file (``read_transforms_file`` says which dataset)."""
    import h5py

    from utils.challenge_data import open_hdf5

    with open_hdf5(path, "transforms file", _EXPECTED_HDF5) as handle:
        names = [k for k in handle.keys() if isinstance(handle[k], h5py.Dataset)]
        key = next((k for k in TRANSFORM_KEYS if k in names), None)
        if key is None and "tforms" in names:
            key = "tforms"
        if key is None and len(names) == 1:
            key = names[0]
        if key is None:
            raise InputError(f"{path}: no dataset named one of {list(TRANSFORM_KEYS) + ['tforms']} "
                             f"(found {sorted(names)})")
        try:
            return np.asarray(handle[key][()]), key == "tforms"  # a scalar or string dataset is no array
        except OSError as error:  # h5py's message names neither the file nor the dataset
            raise InputError(f"{path}: cannot read dataset {key!r} ({error}): the file is damaged") from None


def read_transforms_file(path, num_frames: int, calib_R_T=None) -> np.ndarray:
    """A scan's global transforms from a file: float64 [N, 4, 4] frame image mm -> reference mm, rigid.

    Accepted files:

    - ``.npy``: float [N-1, 4, 4] ``T_{0<-i}`` for i = 1..N-1 (what ``utils.prediction`` returns as
      ``global``) or [N, 4, 4] one per frame (frame 0's the identity for the challenge's convention);
    - ``.h5``/``.hdf5``: the same array in a dataset named ``global_transforms``, ``global`` or
      ``transforms`` (or the file's only dataset); or a ``tforms`` dataset [N, 4, 4] of tracker poses
      (tool -> camera, as in the challenge files), turned into ``T_{0<-i}`` with ``calib_R_T`` (``C``).

    Every transform must be rigid (``check_rigid``; tracker poses ``validate_tforms``), as the
    dataset readers require of the tracker's. Raises FileNotFoundError for a missing file and
    InputError naming the file for anything else.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"transforms file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        array, is_tracker = _load_npy(path), False
    elif suffix in (".h5", ".hdf5"):
        array, is_tracker = _read_hdf5_transforms(path)
    else:
        raise InputError(f"{path}: transforms must be a .npy or .h5 file")
    if array.dtype.kind not in "fiu":
        raise InputError(f"{path}: holds {array.dtype} values of shape {array.shape}; expected float [N-1, 4, 4] "
                         "or [N, 4, 4] transforms")
    array = np.asarray(array, dtype=np.float64)
    if is_tracker:
        from utils.challenge_data import validate_tforms

        if calib_R_T is None:
            raise InputError(f"{path}: holds tracker poses ('tforms'), which need the calibration to convert")
        validate_tforms(array, path, num_frames)
        calib = np.asarray(calib_R_T, dtype=np.float64)
        array = np.linalg.inv(calib) @ np.linalg.inv(array[0]) @ array @ calib  # T_{0<-i}, DESIGN.md section 2
    try:
        transforms = frames_to_reference(array, num_frames)
    except ValueError as error:
        raise InputError(f"{path}: {error}") from None
    check_rigid(transforms, path, first_row=len(transforms) - len(array))
    return transforms

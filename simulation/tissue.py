"""What image formation needs from a phantom: scatterers binned in space, and the attenuating medium.

Both live in the tissue (arm) frame, mm: ``X`` along the arm (elbow -> wrist), ``Y`` radial ->
ulnar, ``Z`` depth from the volar skin (SIMULATOR.md, forearm phantom).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Scatterers:
    """Tissue-fixed point scatterers, sorted into cubic bins (CSR) so a frame can pick its slab.

    Attributes:
        positions: float32 [M, 3], tissue frame, mm; scatterers of bin b are
            ``positions[bin_start[b]:bin_start[b + 1]]``.
        amplitudes: complex64 [M]: ``a_s * A_s``, a circular complex Gaussian draw times the echo
            amplitude ``10^(echo_dB / 20)`` of the tissue the scatterer lies in.
        normals: float32 [M, 3]: unit normal of the interface for specular scatterers (fascia, bone
            surface), zero for diffuse ones; the renderer weights specular echoes by the angle
            between beam and normal.
        bin_origin: float32 [3], mm: corner of bin (0, 0, 0).
        bin_size: edge of a bin, mm.
        bin_shape: (nx, ny, nz) bins; bin (i, j, k) has flat index ``(i * ny + j) * nz + k``.
        bin_start: int64 [nx * ny * nz + 1], CSR offsets into the arrays above.
    """

    positions: np.ndarray
    amplitudes: np.ndarray
    normals: np.ndarray
    bin_origin: np.ndarray
    bin_size: float
    bin_shape: tuple
    bin_start: np.ndarray

    def __len__(self) -> int:
        return int(self.positions.shape[0])


@dataclass
class Medium:
    """Attenuation of the tissue on a regular grid (bone's large value makes its acoustic shadow).

    Attributes:
        attenuation: float32 [nx, ny, nz], dB / cm / MHz (one way); 0 outside the arm.
        origin: float32 [3], mm: position of voxel (0, 0, 0)'s centre.
        spacing: voxel edge, mm (0.5 by default).
    """

    attenuation: np.ndarray
    origin: np.ndarray
    spacing: float


def bin_scatterers(positions, amplitudes, normals, bin_size: float = 2.0, origin=None, shape=None) -> Scatterers:
    """Sort scatterers into cubic CSR bins (the :class:`Scatterers` layout).

    Args:
        positions: float [M, 3], tissue frame, mm (stored as float32).
        amplitudes: complex [M] (stored as complex64).
        normals: float [M, 3] unit normals or zeros (stored as float32).
        bin_size: bin edge, mm.
        origin: [3] mm, corner of bin (0, 0, 0); default: the lowest position rounded down to a
            multiple of ``bin_size`` (so bins of different sets line up).
        shape: (nx, ny, nz); default: enough bins to hold every position. Positions outside the
            grid are clipped into the border bins (they then lie outside their bin's cube).

    Returns:
        Scatterers sorted by flat bin index (stable, so the order within a bin is the input order).
    """
    if bin_size <= 0:
        raise ValueError(f"bin_size={bin_size} mm must be positive")
    # bin from the float32 values that are stored, so a point never lands in a neighbour's cube
    positions = np.ascontiguousarray(positions, dtype=np.float32).reshape(-1, 3)
    amplitudes = np.asarray(amplitudes, dtype=np.complex64).reshape(-1)
    normals = np.ascontiguousarray(normals, dtype=np.float32).reshape(-1, 3)
    count = positions.shape[0]
    if amplitudes.shape[0] != count or normals.shape[0] != count:
        raise ValueError(f"{count} positions, {amplitudes.shape[0]} amplitudes, {normals.shape[0]} normals: lengths differ")
    if origin is None:
        low = positions.min(axis=0) if count else np.zeros(3, np.float32)
        origin = np.floor(low.astype(np.float64) / bin_size) * bin_size
    origin = np.asarray(origin, dtype=np.float32).reshape(3)
    if shape is None:
        high = positions.max(axis=0) if count else origin
        shape = np.maximum(np.floor((high - origin) / np.float32(bin_size)).astype(np.int64) + 1, 1)
    shape = tuple(int(n) for n in shape)
    index = np.floor((positions - origin) / np.float32(bin_size)).astype(np.int64)
    np.clip(index, 0, np.asarray(shape) - 1, out=index)
    flat = (index[:, 0] * shape[1] + index[:, 1]) * shape[2] + index[:, 2]
    del index
    order = np.argsort(flat, kind="stable")
    bin_start = np.zeros(shape[0] * shape[1] * shape[2] + 1, dtype=np.int64)
    np.cumsum(np.bincount(flat, minlength=bin_start.size - 1), out=bin_start[1:])
    return Scatterers(
        positions=positions[order],
        amplitudes=amplitudes[order],
        normals=normals[order],
        bin_origin=origin,
        bin_size=float(bin_size),
        bin_shape=shape,
        bin_start=bin_start,
    )

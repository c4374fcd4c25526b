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

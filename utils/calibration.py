"""The probe calibration: reading, validating and writing the challenge's ``calib_matrix.csv``.

The file holds two 4x4 matrices (DESIGN.md sections 2 and 3):

- ``S`` = ``scaling_from_pixel_to_mm``: image pixel (x, y from 1) -> image mm, diagonal;
- ``C`` = ``spatial_calibration_from_image_coordinate_system_to_tracking_tool_coordinate_system``:
  image mm -> tracker tool, rigid.

Format, 1-based line numbers::

    1      scaling_from_pixel_to_mm
    2-5    the rows of S, 4 comma-separated numbers each
    6      spatial_calibration_from_image_coordinate_system_to_tracking_tool_coordinate_system
    7-10   the rows of C

The official reader picks rows by line number and checks nothing; ``load_calibration`` reads the
same numbers but validates the names, the shape and the geometry, and ``read_calib_matrices`` (the
official name and return value) sits on top of it. ``write_calib_matrices`` writes the same format
with every float's shortest round-trip repr, so the official reader and ours read back exactly the
numbers written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from utils.atomic import atomic_path
from utils.errors import InputError

SCALE_NAME = "scaling_from_pixel_to_mm"
CALIB_R_T_NAME = "spatial_calibration_from_image_coordinate_system_to_tracking_tool_coordinate_system"

# Line layout, 0-based as the official reader indexes ``readlines()``.
_SCALE_NAME_LINE = 0
_SCALE_ROWS = range(1, 5)
_CALIB_NAME_LINE = 5
_CALIB_ROWS = range(6, 10)
NUM_LINES = 10

# Largest accepted |R^T R - I| entry of C's rotation. The public file gives its values to about 9
# significant digits (its R^T R is off by ~4e-10) and a float32 round trip costs ~1e-7; 1e-4 still
# refuses a matrix that holds a scale or shear (the PLUS spine calibration's 2.7 degrees of shear
# would be off by ~5e-2).
ROTATION_TOLERANCE = 1e-4

# The public TUS-REC calibration (DESIGN.md section 3), float64, as written in the challenge file.
REAL_TFORM_CALIB_SCALE = np.diag([0.229389190673828, 0.220979690551758, 1.0, 1.0])
REAL_TFORM_CALIB_R_T = np.array(
    [
        [0.231064671309448, -0.218052035, 0.948189025293473, -70.74132919],
        [-0.190847036, -0.965787273, -0.175591436, -80.6505661],
        [0.954036962825936, -0.140386088, -0.264773903, -46.17662239],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
REAL_TFORM_CALIB_SCALE.setflags(write=False)
REAL_TFORM_CALIB_R_T.setflags(write=False)


@dataclass(frozen=True, eq=False)  # eq would compare arrays elementwise
class Calibration:
    """A validated calibration; both matrices are read-only float64 numpy [4, 4].

    Attributes:
        scale: ``S`` = ``tform_calib_scale``, image pixel -> image mm, ``diag(sx, sy, 1, 1)``.
        calib_R_T: ``C`` = ``tform_calib_R_T``, image mm -> tracker tool (rigid, translation in mm).
    """

    scale: np.ndarray
    calib_R_T: np.ndarray

    @property
    def calib(self) -> np.ndarray:
        """``C @ S``: image pixel -> tracker tool, float64 [4, 4] (mm)."""
        return self.calib_R_T @ self.scale

    @property
    def pixel_size_mm(self) -> tuple[float, float]:
        """``(sx, sy)``: mm per pixel along x (columns) and y (rows)."""
        return float(self.scale[0, 0]), float(self.scale[1, 1])

    def as_tensors(self, dtype: torch.dtype = torch.float32):
        """``(S, C, C @ S)`` as torch tensors [4, 4] of ``dtype`` (the product taken in ``dtype``)."""
        scale = torch.as_tensor(np.array(self.scale), dtype=dtype)
        calib_r_t = torch.as_tensor(np.array(self.calib_R_T), dtype=dtype)
        return scale, calib_r_t, calib_r_t @ scale


def default_calibration() -> Calibration:
    """The public TUS-REC calibration (DESIGN.md section 3); the simulator's default."""
    return Calibration(REAL_TFORM_CALIB_SCALE, REAL_TFORM_CALIB_R_T)


def _as_matrix(value, what: str, source: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    matrix = np.array(value, dtype=np.float64)
    if matrix.shape != (4, 4):
        raise InputError(f"{source}: {what} must be a 4x4 matrix, got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise InputError(f"{source}: {what} has non-finite values:\n{matrix}")
    return matrix


def make_calibration(tform_calib_scale, tform_calib_R_T, source: str = "calibration") -> Calibration:
    """Validate two 4x4 matrices (numpy, torch or nested lists) and return a ``Calibration``.

    ``source`` names where the values come from (a file) in error messages.

    Raises ValueError unless ``S`` is ``diag(sx, sy, 1, 1)`` with ``sx, sy > 0`` (off-diagonal
    entries exactly 0, as the challenge writes them) and ``C`` is rigid: last row exactly
    ``[0, 0, 0, 1]``, rotation with ``max |R^T R - I| <= ROTATION_TOLERANCE`` and ``det R > 0``.
    """
    scale = _as_matrix(tform_calib_scale, f"{SCALE_NAME} (S)", source)
    calib_r_t = _as_matrix(tform_calib_R_T, f"{CALIB_R_T_NAME} (C)", source)

    off_diagonal = scale - np.diag(np.diag(scale))
    if np.any(off_diagonal != 0):
        raise InputError(
            f"{source}: {SCALE_NAME} must be diagonal (a pixel -> mm scaling), "
            f"got off-diagonal values:\n{scale}"
        )
    if not (scale[0, 0] > 0 and scale[1, 1] > 0):
        raise InputError(
            f"{source}: {SCALE_NAME} must have positive x and y scales (mm per pixel), "
            f"got sx={float(scale[0, 0])!r}, sy={float(scale[1, 1])!r}"
        )
    if scale[2, 2] != 1 or scale[3, 3] != 1:
        raise InputError(
            f"{source}: {SCALE_NAME} must end its diagonal with 1, 1 (z stays 0, homogeneous 1), "
            f"got {float(scale[2, 2])!r}, {float(scale[3, 3])!r}"
        )

    if np.any(calib_r_t[3] != np.array([0.0, 0.0, 0.0, 1.0])):
        raise InputError(
            f"{source}: {CALIB_R_T_NAME} must have last row [0, 0, 0, 1], got {calib_r_t[3].tolist()}"
        )
    rotation = calib_r_t[:3, :3]
    deviation = float(np.abs(rotation.T @ rotation - np.eye(3)).max())
    if deviation > ROTATION_TOLERANCE:
        raise InputError(
            f"{source}: the rotation of {CALIB_R_T_NAME} must be orthonormal (rigid image mm -> tool): "
            f"max |R^T R - I| = {deviation:.3g} > {ROTATION_TOLERANCE:g}"
        )
    determinant = float(np.linalg.det(rotation))
    if determinant <= 0:
        raise InputError(
            f"{source}: the rotation of {CALIB_R_T_NAME} must be proper (det = +1), got det = {determinant:.6g}"
        )
    scale.setflags(write=False)
    calib_r_t.setflags(write=False)
    return Calibration(scale, calib_r_t)


def _parse_row(path: Path, line_index: int, text: str) -> list[float]:
    fields = text.split(",")
    if len(fields) != 4:
        raise InputError(
            f"{path}: line {line_index + 1}: expected 4 comma-separated numbers, "
            f"got {len(fields)} field(s): {text!r}"
        )
    values = []
    for field in fields:
        try:
            value = float(field)
        except ValueError:
            raise InputError(
                f"{path}: line {line_index + 1}: {field.strip()!r} is not a number (line {text!r})"
            ) from None
        if not math.isfinite(value):
            raise InputError(f"{path}: line {line_index + 1}: {field.strip()!r} is not finite (line {text!r})")
        values.append(value)
    return values


def load_calibration(path) -> Calibration:
    """Read and validate a ``calib_matrix.csv`` (format in the module docstring).

    Returns a ``Calibration`` with float64 ``S`` (pixel -> mm) and ``C`` (image mm -> tool).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: naming the file and the 1-based line for a wrong name line, a missing or extra
            line, a row without exactly 4 values or a non-numeric / non-finite value; naming the
            file and the expectation for a non-diagonal ``S`` or a non-rigid ``C``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file not found: {path}")
    # Accept what the official reader accepts: '\r\n' line ends, spaces around values and blank
    # lines after the last row (it ignores everything past line 10); refuse other extra content,
    # which is most likely a third matrix or a misplaced block.
    lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: a spreadsheet's byte-order mark
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) != NUM_LINES:
        raise InputError(
            f"{path}: expected {NUM_LINES} lines (name, 4 rows of S, name, 4 rows of C), got {len(lines)}"
            + (f"; line {len(lines)} is {lines[-1]!r}" if lines else " (empty file)")
        )
    for line_index, name in ((_SCALE_NAME_LINE, SCALE_NAME), (_CALIB_NAME_LINE, CALIB_R_T_NAME)):
        if lines[line_index].strip() != name:
            raise InputError(f"{path}: line {line_index + 1}: expected {name!r}, got {lines[line_index]!r}")
    scale = [_parse_row(path, i, lines[i]) for i in _SCALE_ROWS]
    calib_r_t = [_parse_row(path, i, lines[i]) for i in _CALIB_ROWS]
    return make_calibration(scale, calib_r_t, source=str(path))


def read_calib_matrices(filename_calib):
    """The official reader's interface: ``(tform_calib_scale, tform_calib_R_T, tform_calib)``.

    Args:
        filename_calib: path of a ``calib_matrix.csv``.
    Returns:
        three float32 torch tensors [4, 4]: ``S`` (pixel -> image mm), ``C`` (image mm -> tool) and
        ``C @ S`` (pixel -> tool), the product taken in float32 numpy as the official code does,
        so all three are bit-identical to the official reader's on a valid file.
    Raises:
        FileNotFoundError / ValueError as ``load_calibration``.
    """
    calibration = load_calibration(filename_calib)
    # float64 -> float32 rounds exactly as the official reader's str -> float32 cast (numpy parses
    # the text as a Python float first), so the bits agree.
    scale = calibration.scale.astype(np.float32)
    calib_r_t = calibration.calib_R_T.astype(np.float32)
    return torch.from_numpy(scale), torch.from_numpy(calib_r_t), torch.from_numpy(calib_r_t @ scale)


def format_calib_matrices(tform_calib_scale, tform_calib_R_T) -> str:
    """The text of a ``calib_matrix.csv`` for ``S`` and ``C`` (validated first; see ``make_calibration``).

    Every value is written as Python's shortest repr of its float64 value, which parses back to the
    same float64 (and so to the same float32); a float32 input is widened exactly first.
    """
    calibration = make_calibration(tform_calib_scale, tform_calib_R_T, source="write_calib_matrices")
    lines = [SCALE_NAME]
    lines += [",".join(repr(float(v)) for v in row) for row in calibration.scale]
    lines.append(CALIB_R_T_NAME)
    lines += [",".join(repr(float(v)) for v in row) for row in calibration.calib_R_T]
    return "\n".join(lines) + "\n"


def write_calib_matrices(path, tform_calib_scale, tform_calib_R_T) -> Path:
    """Write ``S`` (pixel -> mm, [4, 4]) and ``C`` (image mm -> tool, [4, 4]) as a ``calib_matrix.csv``.

    Inputs may be numpy arrays, torch tensors or nested lists of any float dtype. The file is
    written atomically (temporary name, then rename). Returns ``path``.

    Raises ValueError (before writing anything) if the matrices would not pass ``load_calibration``.
    """
    text = format_calib_matrices(tform_calib_scale, tform_calib_R_T)
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path

"""Sweep augmentations whose labels stay the true motion of the augmented frames.

Reversed playback (``FrameWindowDataset.reverse_prob``) and dropped frames (``max_stride``, and the
irregular offsets of a window drawn from a longer ``sample_range``) need no change of the poses:
the labels are computed from the poses in window order. Two more are here:

- **Left-right mirror** (``Mirror``): the frames' columns reversed. A tissue point at image mm
  ``p = (x, y, 0)`` of a frame is seen at ``F p`` in the mirrored frame, with ``F`` the reflection
  ``x' = axis_mm - x`` (``Mirror.axis_mm``, from the frames' width: pixel column c becomes W + 1 - c,
  pixels counting from 1, DESIGN.md section 2). The true motion between two mirrored frames is then
  ``T' = F T F`` for the original ``T = T_{j<-i}`` (F is its own inverse): a proper rigid motion
  (two reflections), the mirror image of the probe's. The dataset hands out poses, not labels, so
  the poses are mirrored such that the usual label ``C^-1 P_j'^-1 P_i' C`` *is* ``F T F``:
  ``P' = M P C F C^-1``, with ``M`` a reflection of the camera space (it cancels in ``P_j'^-1
  P_i'``, and it keeps ``P'`` a proper rigid pose: ``det P' = det M det F = +1``, so the readers'
  pose checks still hold).
- **Gain** (``apply_gain``): every frame of a window multiplied by one factor, rounded and clipped
  to uint8: a brighter or darker machine setting, the same motion.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from utils.errors import InputError

# The camera-space reflection of mirrored poses: any reflection cancels in the labels; this one
# mirrors the camera's x axis.
_CAMERA_REFLECTION = np.diag([-1.0, 1.0, 1.0, 1.0])


@dataclasses.dataclass(frozen=True)
class Mirror:
    """How a left-right mirrored window's poses are computed.

    Attributes:
        calib_R_T: [4, 4] the calibration's rigid part ``C`` (image mm -> tracker tool, mm).
        axis_mm: ``x' = axis_mm - x`` in image mm: ``(W + 1) S_x`` for frames of W columns of the
            original pixel size ``S_x``; for frames down-sampled by k to w columns, ``(k w + 1) S_x``
            (the columns they cover, ``Mirror.for_frames``).
    """

    calib_R_T: np.ndarray
    axis_mm: float

    def __post_init__(self):
        calib = np.asarray(self.calib_R_T, dtype=np.float64)
        if calib.shape != (4, 4) or not np.isfinite(calib).all():
            raise InputError(f"Mirror: calib_R_T must be a finite [4, 4] matrix, got shape {calib.shape}")
        if not (np.isfinite(self.axis_mm) and self.axis_mm > 0):
            raise InputError(f"Mirror: axis_mm={self.axis_mm!r}: expected a positive width in mm")
        object.__setattr__(self, "calib_R_T", calib)

    @classmethod
    def for_frames(cls, calibration, width_px: int, factor: int = 1) -> Mirror:
        """The mirror of frames ``width_px`` columns wide, down-sampled by ``factor`` from the
        pixels of ``calibration`` (its ``scale`` S and ``calib_R_T`` C)."""
        scale = np.asarray(calibration.scale, dtype=np.float64)
        return cls(np.asarray(calibration.calib_R_T, dtype=np.float64), (int(width_px) * int(factor) + 1) * scale[0, 0])

    def image_reflection(self) -> np.ndarray:
        """``F``: [4, 4] image mm of a frame -> image mm of the mirrored frame."""
        reflection = np.diag([-1.0, 1.0, 1.0, 1.0])
        reflection[0, 3] = self.axis_mm
        return reflection

    def poses(self, tforms: np.ndarray) -> np.ndarray:
        """Poses [n, 4, 4] (tool -> camera) of the mirrored frames: ``M P C F C^-1``."""
        calib = self.calib_R_T
        change = calib @ self.image_reflection() @ np.linalg.inv(calib)
        return _CAMERA_REFLECTION @ np.asarray(tforms, dtype=np.float64) @ change


def apply_gain(frames: np.ndarray, gain: float) -> np.ndarray:
    """uint8 frames multiplied by ``gain``, rounded and clipped to 0..255 (a new array)."""
    if not (np.isfinite(gain) and gain > 0):
        raise InputError(f"gain={gain!r}: expected a positive factor")
    return np.clip(np.rint(frames.astype(np.float32) * np.float32(gain)), 0, 255).astype(np.uint8)

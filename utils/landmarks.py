"""Landmark indices of a scan: the one check every reader, DDF and metric function applies.

A landmark is a row ``(frame from 0, x from 1, y from 1)`` of an int array [K, 3]. The frame must
lie in 1..N-1: displacement fields hold one row per frame *after* frame 0 (row f-1 for frame f), so
a landmark on frame 0 has no row (the official code would silently read row -1, the last frame's).
x counts columns 1..W and y rows 1..H, because pixels count from 1 as in the calibration.
"""

from __future__ import annotations

import numpy as np
import torch

from utils.errors import InputError


def check_landmarks(landmark, num_frames: int, height: int, width: int, source: str = "landmark",
                    integer_dtype: bool = False) -> np.ndarray:
    """Validate landmarks against a scan of ``num_frames`` frames of ``height`` x ``width`` pixels.

    Args:
        landmark: [K, 3] numpy array or tensor of integers (floats holding whole numbers are
            accepted, as tensors built from integer files sometimes are).
        num_frames: N, the scan's frame count (not the N-1 rows of its fields).
        source: what to name in errors, e.g. the file and dataset the landmarks came from.
        integer_dtype: refuse float arrays even when they hold whole numbers (for files, which the
            challenge writes as integers).
    Returns:
        int64 numpy [K, 3].
    Raises:
        ValueError naming ``source``, the landmark row and the bad value.
    """
    if isinstance(landmark, torch.Tensor):
        landmark = landmark.detach().cpu().numpy()
    values = np.asarray(landmark)
    if values.ndim != 2 or values.shape[1] != 3:
        raise InputError(f"{source}: landmarks must be [K, 3] (frame from 0, x from 1, y from 1), "
                         f"got shape {tuple(values.shape)}")
    if values.dtype.kind not in "iu":
        if integer_dtype:
            raise InputError(f"{source}: landmarks must be integers, got dtype {values.dtype}")
        whole = values.dtype.kind == "f" and np.isfinite(values).all() and (values == np.round(values)).all()
        if not whole:
            raise InputError(f"{source}: landmarks must be integers, got dtype {values.dtype} with non-integer values")
    values = values.astype(np.int64)
    checks = (
        (0, "frame index", 1, num_frames - 1, "frame 0 has no displacement field row: DDFs start at frame 1"),
        (1, "x", 1, width, f"x counts columns from 1 to W={width}"),
        (2, "y", 1, height, f"y counts rows from 1 to H={height}"),
    )
    for column, what, low, high, why in checks:
        bad = np.flatnonzero((values[:, column] < low) | (values[:, column] > high))
        if bad.size:
            row = int(bad[0])
            raise InputError(
                f"{source}: landmark row {row} {values[row].tolist()} has {what} {int(values[row, column])}, "
                f"expected {low}..{high} ({why}; {bad.size} landmark(s) out of range)"
            )
    return values

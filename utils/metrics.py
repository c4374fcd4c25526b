"""Evaluation of trackerless freehand reconstruction: the TUS-REC errors, scores and result tables.

What the challenge measures (DESIGN.md section 4)
-------------------------------------------------
For a scan of N frames the displacement fields (DDFs) of frames 1..N-1 are compared in image mm:

- GPE: mean over frames and pixels of ``|GP_true - GP_pred|`` (global fields, ``T_{0<-i}``);
- LPE: the same on the local fields LP (``T_{i-1<-i}``);
- GLE, LLE: mean over the K landmarks of the same distance on GL / LL.

``cal_dist`` is the official formula. The DDF of frame i under transform T is ``(T S p - S p)[0:3]``
for every pixel ``p = [x, y, 0, 1]`` (x = column 1..W, y = row 1..H, pixels count from 1).
Normalised: ``X* = 1 - X / X_identity`` where ``X_identity`` is the error of predicting identity
transforms (all DDFs zero, i.e. the mean norm of the true field). Scores: ``final`` = mean of the
four; ``global`` = (GPE* + GLE*) / 2, ``local`` = (LPE* + LLE*) / 2, ``pixel`` = (GPE* + LPE*) / 2,
``landmark`` = (GLE* + LLE*) / 2.

Two ways to get the errors, both equal to ``cal_dist`` on materialised arrays to 1e-4 mm:

- from transforms (rigid predictions), ``scan_errors_from_transforms``: with
  ``D = (T_true - T_pred)[:3] S`` the error of pixel (x, y) is ``|a x + b y + c|`` (columns 0, 1, 3
  of D; z = 0 drops column 2). An affine field is separable: ``a x + c`` is a row vector and
  ``b y`` a column vector, so each component over a frame is one broadcast add. Frames are taken
  a few at a time so the temporaries stay in cache; no [N-1, 3, H*W] array ever exists.
- from DDF arrays (non-rigid predictions, submissions), ``scan_errors_from_ddfs``: streams over
  frame chunks of anything sliceable (numpy arrays and memmaps, h5py datasets).

Scans without landmarks (``landmark=None``, e.g. the real PLUS scans) have GLE and LLE = NaN, never
zero, and so do the scores that need them (GLE*, LLE*, final, global, local, landmark); the
``pixel`` score still exists. Result tables keep the NaN and averages over scans do not skip it:
a data set in which any scan lacks landmarks has no averaged final score.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from utils.atomic import atomic_path
from utils.landmarks import check_landmarks

ERROR_NAMES = ("GPE", "GLE", "LPE", "LLE")
SCORE_NAMES = ("GPE*", "GLE*", "LPE*", "LLE*", "final", "global", "local", "pixel", "landmark")
IDENTITY_SUFFIX = "_identity"
# A scan whose no-motion error is below this (mm) has no motion to normalise by: its score would be
# float noise divided by float noise (-1e12 for a scan whose poses are all equal). 1 micrometre is far
# below any tracker's precision (~0.1 mm), so no real scan with motion is affected.
MIN_MOTION_MM = 1e-3

# Elements per chunk of the transform path: a few 480x640 frames (~4 MB of float32 each temporary)
# keeps the broadcast temporaries near the CPU caches; a GPU wants far bigger launches.
_CHUNK_ELEMENTS_CPU = 2**20
_CHUNK_ELEMENTS_CUDA = 2**25
# Bytes of one chunk of a DDF array read by the streaming path (true + pred + difference in memory).
_CHUNK_BYTES_DDF = 64 * 2**20


# --------------------------------------------------------------------------------------------
# The official metric
# --------------------------------------------------------------------------------------------


def cal_dist(label, pred, mode: str = "all") -> float:
    """The official TUS-REC distance, mm.

    Args:
        label, pred: numpy arrays of the same shape, mm. ``mode='all'``: DDFs [N-1, 3, H*W] (the
            mean over frames and pixels of the Euclidean norm along axis 1); ``mode='landmark'``:
            landmark DDFs [3, K] (the mean over landmarks of the norm along axis 0).
    Returns:
        float, mm. Computed exactly as the official code does (in the arrays' dtype).
    """
    label = np.asarray(label)
    pred = np.asarray(pred)
    if label.shape != pred.shape:
        raise ValueError(f"cal_dist: label shape {label.shape} differs from pred shape {pred.shape}")
    if mode == "all":
        if label.ndim != 3 or label.shape[1] != 3:
            raise ValueError(f"cal_dist(mode='all') expects [N-1, 3, H*W] arrays, got shape {label.shape}")
        return float(np.sqrt(((label - pred) ** 2).sum(axis=1)).mean())
    if mode == "landmark":
        if label.ndim != 2 or label.shape[0] != 3:
            raise ValueError(f"cal_dist(mode='landmark') expects [3, K] arrays, got shape {label.shape}")
        return float(np.sqrt(((label - pred) ** 2).sum(axis=0)).mean())
    raise ValueError(f"cal_dist: mode={mode!r} is not one of ['all', 'landmark']")


# --------------------------------------------------------------------------------------------
# Errors from transforms (rigid predictions)
# --------------------------------------------------------------------------------------------


def _as_transforms(name: str, value, device=None) -> torch.Tensor:
    if isinstance(value, np.ndarray) and not value.flags.writeable:
        value = np.array(value)  # torch warns on read-only buffers (broadcast views, memmaps)
    tensor = torch.as_tensor(value, device=device)
    if tensor.ndim != 3 or tuple(tensor.shape[1:]) != (4, 4) or tensor.shape[0] == 0:
        raise ValueError(f"{name} must be [N-1, 4, 4] transforms with N >= 2, got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        tensor = tensor.double()
    return tensor


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    if not bool(torch.isfinite(tensor).all()):  # a CPU-GPU sync point; once per call
        bad = (~torch.isfinite(tensor)).nonzero()[0].tolist()
        raise ValueError(f"{name} holds NaN or inf values (first at index {bad}); predictions must be finite")


def _default_chunk_frames(height: int, width: int, device: torch.device) -> int:
    elements = _CHUNK_ELEMENTS_CUDA if device.type == "cuda" else _CHUNK_ELEMENTS_CPU
    return max(1, elements // (height * width))


def field_errors_from_transforms(
    tform_true,
    tform_pred,
    tform_calib_scale,
    height: int,
    width: int,
    chunk_frames: int | None = None,
) -> torch.Tensor:
    """Per-frame mean pixel error of two sets of image-mm transforms, without materialising DDFs.

    Args:
        tform_true, tform_pred: [M, 4, 4] transforms in image mm (global ``T_{0<-i}`` or local
            ``T_{i-1<-i}``, i = 1..M), tensors or arrays, any float dtype; computed on the device of
            ``tform_true``.
        tform_calib_scale: [4, 4] ``S``, image pixel -> image mm.
        height, width: image size H, W in pixels.
        chunk_frames: frames evaluated together (default: about 2**20 pixels on a CPU).
    Returns:
        float64 tensor [M] on the input device: for each frame the mean over the H*W pixels of
        ``|(T_true - T_pred) S p|`` in mm, i.e. the per-frame terms of ``cal_dist(mode='all')``.

    Numerics: the affine coefficients are formed in float64; pixel errors are evaluated in float32
    as a sum of three squared components (no cancellation, unlike the expanded quadratic form),
    summed per image row in float32 and over rows in float64, which keeps the mean within ~1e-5 mm
    of the float64 value for errors of hundreds of mm.
    """
    tform_true = _as_transforms("tform_true", tform_true)
    device = tform_true.device
    tform_pred = _as_transforms("tform_pred", tform_pred, device)
    if tform_true.shape != tform_pred.shape:
        raise ValueError(f"tform_true shape {tuple(tform_true.shape)} differs from tform_pred shape {tuple(tform_pred.shape)}")
    height, width = int(height), int(width)
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    _check_finite("tform_pred", tform_pred)
    scale = torch.as_tensor(tform_calib_scale, device=device).double()
    if tuple(scale.shape) != (4, 4):
        raise ValueError(f"tform_calib_scale must be [4, 4], got shape {tuple(scale.shape)}")
    count = tform_true.shape[0]
    if chunk_frames is None:
        chunk_frames = _default_chunk_frames(height, width, device)
    if int(chunk_frames) < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
    chunk_frames = int(chunk_frames)

    coeff = (tform_true.double() - tform_pred.double())[:, :3, :] @ scale  # [M, 3, 4]
    a, b, c = coeff[..., 0], coeff[..., 1], coeff[..., 3]  # [M, 3] each; column 2 meets z = 0
    xs = torch.arange(1, width + 1, dtype=torch.float64, device=device)  # pixels count from 1
    ys = torch.arange(1, height + 1, dtype=torch.float64, device=device)
    sums = torch.empty(count, dtype=torch.float64, device=device)
    # Two buffers reused by every chunk: multi-MB tensors allocated per chunk are handed back to the
    # kernel by malloc and page-faulted in again every time.
    frames = min(chunk_frames, count)
    squared_buffer = torch.empty(frames, height, width, dtype=torch.float32, device=device)
    component_buffer = torch.empty_like(squared_buffer)
    for start in range(0, count, chunk_frames):
        stop = min(start + chunk_frames, count)
        squared, component = squared_buffer[: stop - start], component_buffer[: stop - start]
        # The affine field is separable: a x + c along a row, b y down a column (float64 -> float32).
        row_part = (a[start:stop, :, None] * xs + c[start:stop, :, None]).float()  # [F, 3, W]
        col_part = (b[start:stop, :, None] * ys).float()  # [F, 3, H]
        torch.add(col_part[:, 0, :, None], row_part[:, 0, None, :], out=squared)  # [F, H, W]
        squared.square_()
        for k in (1, 2):
            torch.add(col_part[:, k, :, None], row_part[:, k, None, :], out=component)
            squared.addcmul_(component, component)
        sums[start:stop] = squared.sqrt_().sum(dim=-1).double().sum(dim=-1)
    return sums / (height * width)


def landmark_errors_from_transforms(tform_true, tform_pred, tform_calib_scale, landmark, height: int, width: int) -> torch.Tensor:
    """Exact float64 error of each landmark, mm.

    Args:
        tform_true, tform_pred: [M, 4, 4] image-mm transforms of frames 1..M (row f-1 is frame f).
        tform_calib_scale: [4, 4] ``S``.
        landmark: int [K, 3] (frame from 0, x from 1, y from 1); frames must be in 1..M.
        height, width: image size, used to validate the landmark pixels.
    Returns:
        float64 tensor [K] on the device of ``tform_true``: ``|(T_true - T_pred) S [x, y, 0, 1]|``,
        the per-landmark terms of ``cal_dist(mode='landmark')`` on GL / LL.
    """
    tform_true = _as_transforms("tform_true", tform_true)
    device = tform_true.device
    tform_pred = _as_transforms("tform_pred", tform_pred, device)
    if tform_true.shape != tform_pred.shape:
        raise ValueError(f"tform_true shape {tuple(tform_true.shape)} differs from tform_pred shape {tuple(tform_pred.shape)}")
    lm = torch.from_numpy(check_landmarks(landmark, tform_true.shape[0] + 1, int(height), int(width))).to(device)
    if lm.shape[0] == 0:
        raise ValueError("landmark is empty [0, 3]; pass landmark=None for a scan without landmarks")
    scale = torch.as_tensor(tform_calib_scale, device=device).double()
    rows = lm[:, 0] - 1  # landmark frame f has DDF row f-1 (frame 0 has none)
    coeff = (tform_true.double()[rows] - tform_pred.double()[rows])[:, :3, :] @ scale  # [K, 3, 4]
    points = torch.stack([lm[:, 1], lm[:, 2], torch.zeros_like(lm[:, 1]), torch.ones_like(lm[:, 1])], dim=1)
    return torch.linalg.vector_norm((coeff @ points.double()[:, :, None])[..., 0], dim=-1)


def scan_errors_from_transforms(
    global_true,
    global_pred,
    local_true,
    local_pred,
    tform_calib_scale,
    landmark,
    height: int,
    width: int,
    chunk_frames: int | None = None,
) -> dict[str, float]:
    """GPE, GLE, LPE, LLE of a scan from its true and predicted transforms.

    Args:
        global_true, global_pred: [N-1, 4, 4] ``T_{0<-i}``, i = 1..N-1, image mm (torch or numpy,
            any float dtype; computed on the device of ``global_true``, CPU or CUDA).
        local_true, local_pred: [N-1, 4, 4] ``T_{i-1<-i}``, i = 1..N-1, image mm.
        tform_calib_scale: [4, 4] ``S``, image pixel -> image mm.
        landmark: int [K, 3] (frame from 0, x from 1, y from 1), or None for a scan without
            landmarks: GLE and LLE are then NaN (not zero).
        height, width: image size in pixels (480, 640 for the challenge data).
        chunk_frames: frames per chunk of the pixel-field evaluation (see
            ``field_errors_from_transforms``).
    Returns:
        ``{'GPE', 'GLE', 'LPE', 'LLE'}`` -> float, mm; equal to ``cal_dist`` on the materialised
        DDFs to 1e-4 mm.
    """
    global_true = _as_transforms("global_true", global_true)
    local_true = _as_transforms("local_true", local_true, global_true.device)
    if global_true.shape != local_true.shape:
        raise ValueError(f"global_true shape {tuple(global_true.shape)} differs from local_true shape {tuple(local_true.shape)}")
    errors = {
        "GPE": float(field_errors_from_transforms(global_true, global_pred, tform_calib_scale, height, width, chunk_frames).mean()),
        "LPE": float(field_errors_from_transforms(local_true, local_pred, tform_calib_scale, height, width, chunk_frames).mean()),
        "GLE": math.nan,
        "LLE": math.nan,
    }
    if landmark is not None:
        errors["GLE"] = float(landmark_errors_from_transforms(global_true, global_pred, tform_calib_scale, landmark, height, width).mean())
        errors["LLE"] = float(landmark_errors_from_transforms(local_true, local_pred, tform_calib_scale, landmark, height, width).mean())
    return {name: errors[name] for name in ERROR_NAMES}


def identity_errors_from_transforms(
    global_true,
    local_true,
    tform_calib_scale,
    landmark,
    height: int,
    width: int,
    chunk_frames: int | None = None,
) -> dict[str, float]:
    """Errors of predicting identity transforms (all DDFs zero): the normalisers of the scores.

    Same arguments and return as ``scan_errors_from_transforms`` without the predictions.
    """
    global_true = _as_transforms("global_true", global_true)
    identity = torch.eye(4, dtype=global_true.dtype, device=global_true.device).expand_as(global_true)
    return scan_errors_from_transforms(
        global_true, identity, local_true, identity, tform_calib_scale, landmark, height, width, chunk_frames
    )


# --------------------------------------------------------------------------------------------
# Errors from DDF arrays (non-rigid predictions, submissions)
# --------------------------------------------------------------------------------------------


def _check_field_shape(name: str, array, expected=None) -> tuple:
    shape = tuple(getattr(array, "shape", ()))
    if len(shape) != 3 or shape[1] != 3 or shape[0] == 0 or shape[2] == 0:
        raise ValueError(f"{name} must be a DDF array [N-1, 3, H*W] with N >= 2, got shape {shape}")
    if expected is not None and shape != tuple(expected):
        raise ValueError(f"{name} has shape {shape}, expected {tuple(expected)}")
    return shape


def _float_chunk(name: str, array, start: int, stop: int) -> np.ndarray:
    chunk = np.asarray(array[start:stop])
    if chunk.dtype not in (np.float32, np.float64):
        chunk = chunk.astype(np.float32)
    if not np.isfinite(chunk).all():
        bad = np.argwhere(~np.isfinite(chunk))[0]
        raise ValueError(f"{name} holds NaN or inf values (first at index {[start + int(bad[0]), *bad[1:].tolist()]})")
    return chunk


def field_errors_from_ddfs(field_true, field_pred=None, chunk_frames: int | None = None) -> np.ndarray:
    """Per-frame mean pixel error of two DDF arrays, streamed over frame chunks.

    Args:
        field_true, field_pred: [M, 3, P] DDFs in mm (GP or LP), float32 or float64; anything
            sliceable along axis 0 into numpy: arrays, memmaps, h5py datasets. ``field_pred=None``
            compares with zero fields (the identity prediction).
        chunk_frames: frames read at once (default: about 64 MB per chunk of one array).
    Returns:
        float64 numpy array [M]: mean over the P pixels of ``|true - pred|`` per frame, mm. Memory
        is a few chunks whatever M, so a 12 GB scan on disk is evaluated in bounded memory.
    """
    shape = _check_field_shape("field_true", field_true)
    if field_pred is not None:
        _check_field_shape("field_pred", field_pred, shape)
    count, _, points = shape
    if chunk_frames is None:
        chunk_frames = max(1, _CHUNK_BYTES_DDF // (3 * points * 4))
    if int(chunk_frames) < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
    chunk_frames = int(chunk_frames)
    out = np.empty(count, dtype=np.float64)
    for start in range(0, count, chunk_frames):
        stop = min(start + chunk_frames, count)
        true = _float_chunk("field_true", field_true, start, stop)
        if field_pred is None:
            diff = torch.from_numpy(np.array(true, copy=True))
        else:
            pred = _float_chunk("field_pred", field_pred, start, stop)
            diff = torch.from_numpy(np.subtract(true, pred, dtype=np.result_type(true, pred)))
        norm = diff.square_().sum(dim=1).sqrt_()  # [F, P]
        # Float64 accumulation: a float32 sum of 307200 errors of hundreds of mm drifts by ~1e-4 mm.
        out[start:stop] = norm.sum(dim=-1, dtype=torch.float64).numpy()
    return out / points


def _landmark_error(name_true: str, name_pred: str, true, pred) -> float:
    true = np.asarray(true, dtype=np.float64)
    if true.ndim != 2 or true.shape[0] != 3 or true.shape[1] == 0:
        raise ValueError(f"{name_true} must be a landmark DDF [3, K] with K >= 1, got shape {true.shape}")
    if pred is None:
        pred = np.zeros_like(true)
    pred = np.asarray(pred, dtype=np.float64)
    if pred.shape != true.shape:
        raise ValueError(f"{name_pred} has shape {pred.shape}, expected {true.shape}")
    for name, value in ((name_true, true), (name_pred, pred)):
        if not np.isfinite(value).all():
            raise ValueError(f"{name} holds NaN or inf values; DDFs must be finite")
    return float(np.sqrt(((true - pred) ** 2).sum(axis=0)).mean())


def scan_errors_from_ddfs(
    GP_true,
    GL_true,
    LP_true,
    LL_true,
    GP_pred,
    GL_pred,
    LP_pred,
    LL_pred,
    chunk_frames: int | None = None,
) -> dict[str, float]:
    """GPE, GLE, LPE, LLE of a scan from DDF arrays (the official names and order of ``predict_ddfs``).

    Args:
        GP_true, LP_true, GP_pred, LP_pred: [N-1, 3, H*W] global / local pixel DDFs in mm, float32 or
            float64, any object sliceable along axis 0 (numpy arrays, memmaps, h5py datasets);
            streamed over frame chunks, never loaded whole.
        GL_true, LL_true, GL_pred, LL_pred: [3, K] landmark DDFs in mm, or all four None for a scan
            without landmarks (GLE and LLE are then NaN).
        chunk_frames: frames read at once (see ``field_errors_from_ddfs``).
    Returns:
        ``{'GPE', 'GLE', 'LPE', 'LLE'}`` -> float, mm; ``cal_dist`` of the arrays to 1e-4 mm.
    Raises:
        ValueError naming the array on a wrong shape, a NaN or inf value, or landmark DDFs given for
        only some of the four.
    """
    shape = _check_field_shape("GP_true", GP_true)
    for name, value in (("LP_true", LP_true), ("GP_pred", GP_pred), ("LP_pred", LP_pred)):
        _check_field_shape(name, value, shape)
    landmark_arrays = {"GL_true": GL_true, "LL_true": LL_true, "GL_pred": GL_pred, "LL_pred": LL_pred}
    given = [name for name, value in landmark_arrays.items() if value is not None]
    if given and len(given) != 4:
        missing = [name for name in landmark_arrays if name not in given]
        raise ValueError(f"landmark DDFs must be all given or all None; got {given}, missing {missing}")
    errors = {"GLE": math.nan, "LLE": math.nan}
    if given:
        errors["GLE"] = _landmark_error("GL_true", "GL_pred", GL_true, GL_pred)
        errors["LLE"] = _landmark_error("LL_true", "LL_pred", LL_true, LL_pred)
    errors["GPE"] = float(_named_field_errors("GP", GP_true, GP_pred, chunk_frames).mean())
    errors["LPE"] = float(_named_field_errors("LP", LP_true, LP_pred, chunk_frames).mean())
    return {name: errors[name] for name in ERROR_NAMES}


def _named_field_errors(prefix: str, true, pred, chunk_frames) -> np.ndarray:
    """``field_errors_from_ddfs`` with errors that name the caller's arrays (GP_true, ...)."""
    try:
        return field_errors_from_ddfs(true, pred, chunk_frames)
    except ValueError as error:
        message = str(error).replace("field_true", f"{prefix}_true").replace("field_pred", f"{prefix}_pred")
        raise ValueError(message) from None


def identity_errors_from_ddfs(GP_true, GL_true, LP_true, LL_true, chunk_frames: int | None = None) -> dict[str, float]:
    """Errors of predicting all-zero DDFs (identity transforms): the mean norms of the true fields.

    Same arrays and return as ``scan_errors_from_ddfs`` without the predictions; ``GL_true`` and
    ``LL_true`` both None for a scan without landmarks.
    """
    if (GL_true is None) != (LL_true is None):
        raise ValueError("GL_true and LL_true must be both given or both None")
    shape = _check_field_shape("GP_true", GP_true)
    _check_field_shape("LP_true", LP_true, shape)
    errors = {"GLE": math.nan, "LLE": math.nan}
    if GL_true is not None:
        errors["GLE"] = _landmark_error("GL_true", "GL_pred", GL_true, None)
        errors["LLE"] = _landmark_error("LL_true", "LL_pred", LL_true, None)
    errors["GPE"] = float(_named_field_errors("GP", GP_true, None, chunk_frames).mean())
    errors["LPE"] = float(_named_field_errors("LP", LP_true, None, chunk_frames).mean())
    return {name: errors[name] for name in ERROR_NAMES}


# --------------------------------------------------------------------------------------------
# Normalised scores
# --------------------------------------------------------------------------------------------


def normalised_scores(errors: Mapping[str, float], identity_errors: Mapping[str, float]) -> dict[str, float]:
    """TUS-REC normalised scores of one scan (DESIGN.md section 4); 1 is perfect, 0 is as good as
    predicting no motion, negative is worse than that.

    Args:
        errors: ``{'GPE', 'GLE', 'LPE', 'LLE'}`` -> mm, the prediction's errors.
        identity_errors: the same for the identity prediction (``identity_errors_from_*``).
    Returns:
        dict with ``SCORE_NAMES``: ``'GPE*' = 1 - GPE / GPE_identity`` (likewise GLE*, LPE*, LLE*),
        ``final`` (mean of the four), ``global`` (GPE*, GLE*), ``local`` (LPE*, LLE*), ``pixel``
        (GPE*, LPE*), ``landmark`` (GLE*, LLE*), all floats without unit. A term is NaN where its
        error is NaN (no landmarks) or its identity error is below ``MIN_MOTION_MM`` (a scan without
        motion cannot be normalised: undefined, see ``without_motion``); every score built on a NaN
        term is NaN, so without landmarks only GPE*, LPE* and ``pixel`` are numbers.
    """
    missing = [name for name in ERROR_NAMES if name not in errors or name not in identity_errors]
    if missing:
        raise ValueError(f"errors and identity_errors need keys {list(ERROR_NAMES)}; missing {missing}")
    terms = {}
    for name in ERROR_NAMES:
        error, reference = float(errors[name]), float(identity_errors[name])
        if math.isnan(error) or math.isnan(reference) or reference < MIN_MOTION_MM:
            terms[name] = math.nan
        else:
            terms[name] = 1.0 - error / reference
    scores = {f"{name}*": terms[name] for name in ERROR_NAMES}
    scores["final"] = (terms["GPE"] + terms["GLE"] + terms["LPE"] + terms["LLE"]) / 4
    scores["global"] = (terms["GPE"] + terms["GLE"]) / 2
    scores["local"] = (terms["LPE"] + terms["LLE"]) / 2
    scores["pixel"] = (terms["GPE"] + terms["LPE"]) / 2
    scores["landmark"] = (terms["GLE"] + terms["LLE"]) / 2
    return scores


def without_motion(identity_errors: Mapping[str, float]) -> bool:
    """True for a scan whose probe does not move (no-motion errors below ``MIN_MOTION_MM``), whose
    normalised scores are therefore undefined. ``identity_errors``: ``{'GPE', ...}`` -> mm."""
    return any(float(identity_errors[name]) < MIN_MOTION_MM for name in ERROR_NAMES
               if not math.isnan(float(identity_errors[name])))


# --------------------------------------------------------------------------------------------
# Result tables
# --------------------------------------------------------------------------------------------

ROW_COLUMNS = (
    ("subject", "scan")
    + ERROR_NAMES
    + tuple(name + IDENTITY_SUFFIX for name in ERROR_NAMES)
    + SCORE_NAMES
    + ("runtime_s",)
)


def scan_row(
    subject,
    scan: str,
    errors: Mapping[str, float],
    identity_errors: Mapping[str, float],
    runtime_s: float = math.nan,
    **extra,
) -> dict:
    """One row of the per-scan table: errors (mm), identity errors (mm), scores, runtime (s).

    Args:
        subject: subject id (e.g. ``'000'``); scan: scan name (e.g. ``'LH_rotation'``).
        errors, identity_errors: ``{'GPE', 'GLE', 'LPE', 'LLE'}`` -> mm.
        runtime_s: seconds the method took on this scan (prediction time, measured by the caller).
        extra: further columns, e.g. ``protocol='rotation'`` to group the summary by.
    Returns:
        dict with the columns ``ROW_COLUMNS`` followed by ``extra``.
    """
    clash = sorted(set(extra) & set(ROW_COLUMNS))
    if clash:
        raise ValueError(f"extra columns {clash} clash with the standard columns {list(ROW_COLUMNS)}")
    row = {"subject": subject, "scan": scan}
    row.update({name: float(errors[name]) for name in ERROR_NAMES})
    row.update({name + IDENTITY_SUFFIX: float(identity_errors[name]) for name in ERROR_NAMES})
    row.update(normalised_scores(errors, identity_errors))
    row["runtime_s"] = float(runtime_s)
    row.update(extra)
    return row


def results_table(rows: Sequence[Mapping]) -> pd.DataFrame:
    """Per-scan DataFrame from ``scan_row`` dicts, standard columns first, extra columns after."""
    table = pd.DataFrame(list(rows))
    if table.empty:
        return pd.DataFrame(columns=list(ROW_COLUMNS))
    missing = [name for name in ROW_COLUMNS if name not in table.columns]
    if missing:
        raise ValueError(f"rows lack the columns {missing}; build them with scan_row")
    extra = [name for name in table.columns if name not in ROW_COLUMNS]
    return table[list(ROW_COLUMNS) + extra]


SUMMARY_COLUMNS = ERROR_NAMES + tuple(name + IDENTITY_SUFFIX for name in ERROR_NAMES) + SCORE_NAMES + ("runtime_s",)


def summarise(table: pd.DataFrame, by: str | Sequence[str] | None = None) -> pd.DataFrame:
    """Mean and standard deviation over scans of every error, score and runtime.

    Args:
        table: per-scan table from ``results_table``.
        by: optional column name(s) to group by (e.g. ``'protocol'`` or ``'subject'``).
    Returns:
        DataFrame with one row per group (index ``'all'`` without ``by``), columns ``num_scans`` then
        ``<name>_mean`` and ``<name>_std`` (sample std, NaN for a single scan) for each name in
        ``SUMMARY_COLUMNS``. NaN is not skipped: a group in which any scan lacks landmarks has NaN
        landmark-based means (GLE, LLE, final, ...), as the score of the group is undefined.
    """
    missing = [name for name in SUMMARY_COLUMNS if name not in table.columns]
    if missing:
        raise ValueError(f"table lacks the columns {missing}; build it with results_table")
    values = table[list(SUMMARY_COLUMNS)].astype(np.float64)
    if by is None:
        groups = [("all", values)]
    else:
        keys = [by] if isinstance(by, str) else list(by)
        unknown = [key for key in keys if key not in table.columns]
        if unknown:
            raise ValueError(f"cannot group by {unknown}: the table's columns are {list(table.columns)}")
        grouped = values.groupby([table[key] for key in keys], sort=True)
        groups = list(grouped)
    records, index = [], []
    for key, group in groups:
        record = {"num_scans": len(group)}
        for name in SUMMARY_COLUMNS:
            record[f"{name}_mean"] = group[name].mean(skipna=False)
            record[f"{name}_std"] = group[name].std(skipna=False) if len(group) > 1 else math.nan
        records.append(record)
        index.append(key[0] if isinstance(key, tuple) and len(key) == 1 else key)
    names = None if by is None else ([by] if isinstance(by, str) else list(by))
    if names is not None and len(names) > 1:
        result_index = pd.MultiIndex.from_tuples(index, names=names)
    else:
        result_index = pd.Index(index, name=None if names is None else names[0])
    return pd.DataFrame(records, index=result_index)


def write_csv(table: pd.DataFrame, path, index: bool = False):
    """Write a table to ``path`` atomically (temporary file, then rename); returns the Path.

    Use ``index=True`` for ``summarise`` output, whose index holds the group.
    """
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=index)
    return Path(path)

"""The TUS-REC challenge's submission entry point: ``predict_ddfs(frames, landmark, data_path_calib, device)``.

The challenge's harness (its ``test.py``) imports this function and calls it once per scan::

    from predict_ddfs import predict_ddfs
    GP, GL, LP, LL = predict_ddfs(frames, landmark, data_path_calib, device)

and times each call as the scan's runtime. Which network runs is set by an environment variable,
never by a path in the code:

    TUSREC_CHECKPOINT=/path/to/best.pt     a checkpoint written by train.py

The network is loaded on the first call and kept for later calls with the same checkpoint and
device (keyed by the checkpoint's resolved path and the device; a checkpoint file rewritten since is
loaded again), so only the first scan pays for loading it. ``load_predictor`` loads it ahead of the
first scan if a harness prefers.

Prediction is ``utils.evaluation.predict_transforms`` (every frame, many windows per forward pass,
frames down-sampled as the model was trained); the DDFs are ``utils.Transf2DDFs.cal_global_ddfs`` /
``cal_local_ddfs`` evaluated on ``device``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from utils.calibration import load_calibration
from utils.checkpoint import load_checkpoint, model_from_checkpoint
from utils.errors import InputError
from utils.evaluation import (
    PredictionSettings,
    check_finite_transforms,
    configure_cpu_inference,
    frame_size_warning,
    predict_transforms,
    prepare_model_for_inference,
)
from utils.transform import reference_image_points
from utils.Transf2DDFs import cal_global_ddfs, cal_local_ddfs

CHECKPOINT_ENV = "TUSREC_CHECKPOINT"


@dataclasses.dataclass(frozen=True)
class Predictor:
    """A loaded network with how to read its outputs (``PredictionSettings``) and its device."""

    model: torch.nn.Module
    settings: PredictionSettings
    device: torch.device
    checkpoint: Path
    frame_size: tuple[int, int] | None = None  # (H, W) trained on; None for older checkpoints


_PREDICTORS: dict[tuple[str, str], tuple[int, Predictor]] = {}
_LOCK = threading.Lock()


def checkpoint_path() -> Path:
    """The checkpoint named by ``$TUSREC_CHECKPOINT``; FileNotFoundError when unset or missing."""
    value = os.environ.get(CHECKPOINT_ENV, "").strip()
    if not value:
        raise FileNotFoundError(
            f"predict_ddfs: set the environment variable {CHECKPOINT_ENV} to the checkpoint to use "
            f"(e.g. {CHECKPOINT_ENV}=results/003-baseline/best.pt, written by train.py)")
    path = Path(value).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"predict_ddfs: {CHECKPOINT_ENV}={value!r} does not name a file")
    return path.resolve()


def load_predictor(device, checkpoint=None) -> Predictor:
    """The network of ``checkpoint`` (default ``$TUSREC_CHECKPOINT``) on ``device``, cached.

    The first load on a CPU also applies ``configure_cpu_inference`` (process-wide malloc settings
    that make CPU inference about twice as fast).
    """
    path = checkpoint_path() if checkpoint is None else Path(checkpoint).resolve()
    device = torch.device(device)
    key = (str(path), str(device))
    stamp = path.stat().st_mtime_ns if path.is_file() else -1
    with _LOCK:
        cached = _PREDICTORS.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        if device.type == "cpu":
            configure_cpu_inference()
        ckpt = load_checkpoint(path)
        model = prepare_model_for_inference(model_from_checkpoint(ckpt, device), device)
        trained = ckpt.get("frame_size")
        predictor = Predictor(model, PredictionSettings.from_options(ckpt["options"]), device, path,
                              None if trained is None else (int(trained[0]), int(trained[1])))
        _PREDICTORS[key] = (stamp, predictor)
        return predictor


def clear_cache() -> None:
    """Forget every cached network (frees their memory)."""
    with _LOCK:
        _PREDICTORS.clear()


@functools.lru_cache(maxsize=4)
def _pixel_grid(height: int, width: int) -> torch.Tensor:
    return reference_image_points([height, width], [height, width])


def predict_ddfs(frames, landmark, data_path_calib, device):
    """The four predicted DDFs of one scan, as the TUS-REC submission harness expects.

    Args:
        frames: uint8 numpy [N, H, W], the scan's frames (480 x 640 in the challenge).
        landmark: int numpy [K, 3], rows ``(frame from 0, x from 1, y from 1)`` with frames in
            1..N-1 (K = 100 in 2025, 20 in 2024); None for a scan without landmarks (GL and LL are
            then [3, 0]).
        data_path_calib: path of the dataset's ``calib_matrix.csv``.
        device: ``torch.device`` or a name (``'cuda'``, ``'cpu'``) where the network and the DDFs run.
    Returns:
        ``(GP, GL, LP, LL)``, float32 numpy, mm, no NaN: global DDFs of frames 1..N-1 [N-1, 3, H*W]
        (pixel order of ``reference_image_points([H, W], [H, W])``), global landmark DDFs [3, K],
        local DDFs [N-1, 3, H*W] and local landmark DDFs [3, K]. Global: displacement under
        ``T_{0<-i}``; local: under ``T_{i-1<-i}`` (DESIGN.md section 2).
    Raises:
        FileNotFoundError: ``$TUSREC_CHECKPOINT`` unset or missing, or no calibration file.
        ValueError: frames that are not uint8 [N, H, W] with N >= NUM_SAMPLES, invalid landmarks, or
            a non-finite prediction.
    """
    predictor = load_predictor(device)
    frames = np.asarray(frames)
    if frames.ndim != 3 or frames.dtype != np.uint8:
        raise InputError(f"predict_ddfs: frames must be uint8 [N, H, W], got {frames.dtype} {frames.shape}")
    height, width = int(frames.shape[1]), int(frames.shape[2])
    message = frame_size_warning(predictor.model, predictor.frame_size, height, width)
    if message is not None:
        warnings.warn(f"predict_ddfs: {message} ({predictor.checkpoint})", stacklevel=2)
    calibration = load_calibration(data_path_calib)
    if landmark is None:
        landmark = np.zeros((0, 3), dtype=np.int64)
    global_pred, local_pred, _ = predict_transforms(predictor.model, frames, predictor.settings, calibration.scale,
                                                    predictor.device)
    check_finite_transforms(global_pred, local_pred, source="predict_ddfs")
    scale = torch.as_tensor(np.array(calibration.scale), dtype=torch.float64)
    points = _pixel_grid(height, width)
    # The fields are evaluated where the transforms are: on the GPU when the network runs there.
    global_pred, local_pred = global_pred.to(predictor.device), local_pred.to(predictor.device)
    GP, GL = cal_global_ddfs(global_pred, scale, points, landmark, w=width, h=height)
    LP, LL = cal_local_ddfs(local_pred, scale, points, landmark, w=width, h=height)
    return GP, GL, LP, LL

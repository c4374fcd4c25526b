"""What the benchmark scripts share: the official DDF formulation, random scans, one-process measurements.

- ``official_cal_ddfs``: the one re-implementation of the challenge's ``cal_global_ddfs`` /
  ``cal_local_ddfs`` body that every benchmark compares against;
- ``make_scan``: a deterministic random rigid scan (and optionally a drifting prediction of it)
  under the public TUS-REC calibration;
- ``time_calls``, ``rss_bytes``, ``peak_rss_bytes``, ``run_worker``: each (implementation, N) is
  measured in its own subprocess (the calling script re-invoked with a hidden worker flag, which
  prints one JSON line), so the peak resident memory read from ``ru_maxrss`` is that measurement's.

The scripts put the repository root on ``sys.path`` before importing this module, so ``utils``
resolves here too.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from utils.calibration import REAL_TFORM_CALIB_R_T, REAL_TFORM_CALIB_SCALE
from utils.transform import chain_local_transforms, global_transforms, local_transforms, params_to_matrix

REPO_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# The official formulation
# --------------------------------------------------------------------------------------------


def official_cal_ddfs(transformation, tform_calib_scale, image_points, landmark, w=640, h=480):
    """The challenge's ``cal_global_ddfs`` / ``cal_local_ddfs`` body (identical but for names), kept as is.

    Args:
        transformation: float32 [N-1, 4, 4] image-mm transforms (global ``T_{0<-i}`` or local ``T_{i-1<-i}``).
        tform_calib_scale: float32 [4, 4] ``S``, pixel -> image mm.
        image_points: float32 [4, H*W] every pixel, ``reference_image_points([h, w], [h, w])``.
        landmark: int [K, 3] (numpy or tensor), rows ``(frame from 0, x from 1, y from 1)``.
    Returns:
        float32 numpy ``(DDF [N-1, 3, H*W], landmark_DDF [3, K])`` in mm.

    Its memory is part of what is measured: a [N-1, 4, H*W] product, then a subtracted [N-1, 3, H*W]
    copy, both alive until the return.
    """
    allpts = torch.matmul(transformation, torch.matmul(tform_calib_scale, image_points))
    allpts_ddf = allpts[:, 0:3, :] - torch.matmul(tform_calib_scale, image_points)[0:3, :]
    # Landmarks are 1-based (x, y) and index the field's row ``frame - 1`` (DESIGN.md section 2).
    landmark_ddf = allpts_ddf.reshape(allpts_ddf.shape[0], 3, h, w)[
        landmark[:, 0] - 1, :, landmark[:, 2] - 1, landmark[:, 1] - 1
    ].T
    return allpts_ddf.cpu().numpy(), landmark_ddf.cpu().numpy()


# --------------------------------------------------------------------------------------------
# Random scans (deterministic for a seed, so every worker sees the same scan)
# --------------------------------------------------------------------------------------------


def _random_walk(generator, num_frames, step_rad, step_mm, start=None):
    """Tool -> camera poses float64 [N, 4, 4] of a random walk; ``start`` (6 values) replaces the first step."""
    steps = torch.cat([step_rad * torch.randn(num_frames, 3, generator=generator, dtype=torch.float64),
                       step_mm * torch.randn(num_frames, 3, generator=generator, dtype=torch.float64)], dim=1)
    if start is not None:
        steps[0] = torch.as_tensor(start, dtype=torch.float64)
    return chain_local_transforms(params_to_matrix(steps))


def make_scan(num_frames, height, width, num_landmarks, seed, *, start=None, drift=None) -> dict:
    """A random rigid scan under the public TUS-REC calibration, and optionally a drifting prediction.

    Poses are a random walk of ~1 degree and ~0.8 mm per frame, like a hand-held sweep; ``start``
    (``[a_Z, a_Y, a_X, t_x, t_y, t_z]``, radians and mm) sets the first pose instead of a random step.
    ``drift`` = ``(step_rad, step_mm)`` adds a prediction whose accumulated error is a second, smaller
    random walk composed onto the true poses.

    Returns a dict of torch tensors: ``global_true`` / ``local_true`` (and with ``drift``
    ``global_pred`` / ``local_pred``) float32 [N-1, 4, 4] image-mm transforms, ``scale`` float32
    [4, 4] ``S``, ``landmark`` int64 [K, 3] ``(frame from 1, x from 1, y from 1)``.
    """
    generator = torch.Generator().manual_seed(seed)
    # The draw order (poses, drift, landmarks) fixes the numbers a seed gives; keep it.
    tforms = _random_walk(generator, num_frames, 0.02, 0.8, start)
    calib = torch.tensor(np.array(REAL_TFORM_CALIB_R_T), dtype=torch.float64)
    # Stored poses are float32 (DESIGN.md section 3); the official code works in float32 throughout.
    scan = {
        "global_true": global_transforms(tforms, calib).float(),
        "local_true": local_transforms(tforms, calib).float(),
        "scale": torch.tensor(np.array(REAL_TFORM_CALIB_SCALE), dtype=torch.float32),
    }
    if drift is not None:
        tforms_pred = tforms @ _random_walk(generator, num_frames, drift[0], drift[1],
                                                torch.zeros(6, dtype=torch.float64))
        scan["global_pred"] = global_transforms(tforms_pred, calib).float()
        scan["local_pred"] = local_transforms(tforms_pred, calib).float()
    # Frame 0 is every global field's reference and has no row, so landmarks sit on frames 1..N-1.
    scan["landmark"] = torch.stack([
        torch.randint(1, num_frames, (num_landmarks,), generator=generator),
        torch.randint(1, width + 1, (num_landmarks,), generator=generator),
        torch.randint(1, height + 1, (num_landmarks,), generator=generator),
    ], dim=1)
    return scan


# --------------------------------------------------------------------------------------------
# One measurement per subprocess
# --------------------------------------------------------------------------------------------


def time_calls(call, repeats):
    """Time ``call()`` ``repeats`` times; returns ``(times in s, the last call's result)``.

    The previous result is dropped before each call, so the process's peak holds one call's output.
    """
    times, result = [], None
    for _ in range(repeats):
        result = None
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
    return times, result


def rss_bytes():
    """This process's resident memory now, in bytes (the baseline a peak is compared with)."""
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes():
    """This process's peak resident memory so far, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_worker(script, worker_args, what):
    """Run ``script`` with ``worker_args`` in a fresh interpreter and return its last stdout line as JSON.

    ``what`` names the measurement in the error raised when the worker fails.
    """
    command = [sys.executable, str(Path(script).resolve()), *map(str, worker_args)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"worker {what} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def repo_path(path):
    """``path`` itself if absolute, else relative to the repository root (where the scripts write)."""
    path = Path(path)
    return path if path.is_absolute() else REPO_ROOT / path

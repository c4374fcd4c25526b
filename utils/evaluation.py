"""Whole-scan evaluation of a pose network: predict every frame of a scan, score it, tabulate and save.

The one flow shared by ``generate_DDF.py``, ``predict_ddfs.py`` and the training loop's whole-scan
validation:

1. ``predict_transforms``: the network over every frame window of a scan (many windows per forward
   pass, ``utils.prediction``), local transforms chained into global ones. Down-sampled models get
   their frames down-sampled the same way (``downsample_frames``); predictions stay in the ORIGINAL
   image's mm frame (the network only sees smaller images), so the metrics and the DDFs use the
   original ``S``, H and W.
2. ``evaluate_scan``: ground-truth transforms from the tracker poses, the prediction, the official
   errors GPE/GLE/LPE/LLE computed from transforms in chunks (never materialised DDFs; equal to the
   official ``cal_dist`` on materialised arrays to 1e-4 mm), the identity errors, the normalised
   scores and the runtime, as a ``ScanResult``.
3. ``results_table``, ``summary_table``, ``write_metrics_h5``, ``format_tables``, ``plot_scan``,
   ``replaced_folder``: what ``generate_DDF.py`` writes and prints.

Runtime (``ScanResult.runtime_s``) is the challenge's "time to predict all positions of a scan": the
wall time from the frames in memory (full size) to the predicted global and local transforms, with
the model already loaded; it includes down-sampling and chaining. The time to turn transforms into
the four DDF arrays is reported separately (``ddf_s``) where DDFs are produced.

Conventions (DESIGN.md section 2): transforms are image-mm ``T_{0<-i}`` (global) and ``T_{i-1<-i}``
(local) for frames i = 1..N-1, float64 [N-1, 4, 4] on the CPU here; ``S`` maps pixels (from 1) to
image mm. Scans without landmarks (the real PLUS scans) have GLE, LLE and the scores built on them
as NaN: absent, never zero.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from utils import atomic, metrics
from utils import transform as tf
from utils.atomic import atomic_path
from utils.calibration import Calibration
from utils.challenge_data import Scan, ScanFile, ScanRef, read_landmarks, read_scan
from utils.errors import InputError
from utils.hdf5_writing import writing_hdf5
from utils.prediction import predict_scan_transforms
from utils.training_data import downsample_frames

log = logging.getLogger(__name__)

PROTOCOL_ROTATION = "rotation"
PROTOCOL_SWEEP = "sweep"
PROTOCOL_OTHER = "other"
# 2024 sweeps: arm, probe parallel/perpendicular to the forearm, straight/C/S path, direction.
_SWEEP_NAME = re.compile(r"^(LH|RH)_(Par|Per)_(L|C|S)_(DtP|PtD)$")

# Windows per forward pass on a CPU, by the number of pixels of the network's input frame. Measured
# for efficientnet_b1 on 2 cores (benchmarks/bench_generate.py --tune, pairs/s at batch 1 / best):
# 120x160 90 / 317 at 16 (32 is slower again), 240x320 54 / 82 at 4, 480x640 15.5 / 16.6 at 2 (flat
# up to 16, then slower: at that size one window already fills the caches and bigger batches only
# add memory traffic). Two threads beat one at every size. Keys are upper bounds on H*W.
CPU_BATCH_SIZES = ((200 * 200, 16), (320 * 480, 4), (math.inf, 2))
# Networks whose cost per window does not grow with the frame size (a fixed number of patches):
# windows per forward pass on a CPU. patch_flow on 2 cores at 480x640: 0.17 s per pair at batch 2,
# 0.04 at 16 (per-call overheads dominate small batches).
# seq_flow: windows per call of its temporal part (its frame pairs are measured once per scan).
CPU_BATCH_SIZE_BY_MODEL = {"patch_flow": 32, "seq_flow": 16}

# glibc malloc options (mallopt parameter numbers from malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Below this size allocations come from the heap and are reused instead of being mmap-ed and
# page-faulted in anew for every layer of every forward pass (see ``configure_cpu_inference``).
_MMAP_THRESHOLD_BYTES = 256 * 2**20
_TRIM_THRESHOLD_BYTES = 512 * 2**20

METRICS_H5_OFFICIAL = ("GPE", "GLE", "LPE", "LLE", "time_elapsed")
# Marks a folder as written by this module, so ``replaced_folder`` never deletes anything else.
RESULTS_MARKER = ".tusrec-evaluation"


# --------------------------------------------------------------------------------------------
# Settings of a prediction
# --------------------------------------------------------------------------------------------


def scan_protocol(name: str) -> str:
    """``'rotation'`` for 2025 ``*_rotation`` scans, ``'sweep'`` for 2024 names such as
    ``LH_Par_L_DtP``, ``'other'`` for anything else (e.g. the real PLUS scans)."""
    if name == PROTOCOL_ROTATION or name.endswith("_" + PROTOCOL_ROTATION):
        return PROTOCOL_ROTATION
    if _SWEEP_NAME.match(name):
        return PROTOCOL_SWEEP
    return PROTOCOL_OTHER


def _option(options, key: str, default=None):
    if isinstance(options, Mapping):
        return options.get(key, default)
    return getattr(options, key, default)


@dataclasses.dataclass(frozen=True)
class PredictionSettings:
    """How a network's outputs turn into a scan's transforms (from the checkpoint's options).

    Attributes:
        pred_type: network output per pair (``parameter``, ``transform``, ``quaternion``, ``point``).
        num_samples: frames per input window (the network's input channels).
        num_pred: transforms predicted per window (the last ``num_pred`` frames of the window).
        downsample: integer factor of area down-sampling of the frames the network was trained on.
        batch_size: windows per forward pass; None chooses by device and frame size
            (``default_batch_size``).
        cuda_batch_size: windows per forward pass on a GPU when ``batch_size`` is None (the
            training options' ``inference_batch_size``).
        amp_dtype: ``"bfloat16"`` / ``"float16"`` for autocast on CUDA (the training options' ``amp``
            and ``amp_dtype``), None for full precision. Never used on the CPU.
        cpu_batch_size: windows per forward pass on a CPU when ``batch_size`` is None; None chooses
            by frame size (``CPU_BATCH_SIZES``), a number is the model's own (``CPU_BATCH_SIZE_BY_MODEL``).
        window_pairs: the pairs each window predicts (``utils.transform.window_pairs``): the baseline's,
            or every consecutive pair (a sequence model; checkpoints from before the option have none,
            which means the baseline's).
    """

    pred_type: str = "parameter"
    num_samples: int = 2
    num_pred: int = 1
    downsample: int = 1
    batch_size: int | None = None
    cuda_batch_size: int = 32
    amp_dtype: str | None = None
    cpu_batch_size: int | None = None
    window_pairs: str = "baseline"

    def __post_init__(self):
        if self.pred_type not in tf.PRED_TYPES:
            raise InputError(f"pred_type={self.pred_type!r} is not one of {list(tf.PRED_TYPES)}")
        try:  # validates num_samples, num_pred and window_pairs together
            tf.window_pairs(self.window_pairs, self.num_samples, self.num_pred)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        if int(self.downsample) != self.downsample or self.downsample < 1:
            raise InputError(f"downsample={self.downsample!r}: expected an integer >= 1")
        if self.batch_size is not None and (int(self.batch_size) != self.batch_size or self.batch_size < 1):
            raise InputError(f"batch_size={self.batch_size!r}: expected a positive integer or None (automatic)")
        if self.amp_dtype not in (None, "bfloat16", "float16"):
            raise InputError(f"amp_dtype={self.amp_dtype!r}: expected None, 'bfloat16' or 'float16'")

    @classmethod
    def from_options(cls, options, batch_size: int | None = None) -> PredictionSettings:
        """Settings from a checkpoint's ``options`` dict (or a ``TrainOptions``); ``batch_size`` overrides."""
        missing = [key for key in ("pred_type", "num_samples", "num_pred") if _option(options, key) is None]
        if missing:
            raise InputError(f"options lack {missing}; they come from the checkpoint written by train.py")
        amp = bool(_option(options, "amp", False))
        return cls(
            pred_type=str(_option(options, "pred_type")),
            num_samples=int(_option(options, "num_samples")),
            num_pred=int(_option(options, "num_pred")),
            downsample=int(_option(options, "downsample", 1) or 1),
            batch_size=batch_size,
            cuda_batch_size=int(_option(options, "inference_batch_size", 32) or 32),
            amp_dtype=str(_option(options, "amp_dtype", "bfloat16")) if amp else None,
            cpu_batch_size=CPU_BATCH_SIZE_BY_MODEL.get(_option(options, "model_name")),
            window_pairs=str(_option(options, "window_pairs", "baseline") or "baseline"),
        )

    def network_frame_size(self, height: int, width: int) -> tuple[int, int]:
        """The frame size the network sees for original frames of ``height`` x ``width`` pixels."""
        return height // self.downsample, width // self.downsample

    def resolved_batch_size(self, device, height: int, width: int) -> int:
        """Windows per forward pass for original frames of ``height`` x ``width`` on ``device``."""
        if self.batch_size is not None:
            return int(self.batch_size)
        if self.cpu_batch_size is not None and torch.device(device).type == "cpu":
            return int(self.cpu_batch_size)
        return default_batch_size(device, *self.network_frame_size(height, width), cuda_batch_size=self.cuda_batch_size)

    def torch_amp_dtype(self, device) -> torch.dtype | None:
        """The autocast dtype on ``device`` (None on the CPU, where autocast would change the numbers
        the network was validated with and is not faster for every layer)."""
        if self.amp_dtype is None or torch.device(device).type != "cuda":
            return None
        return getattr(torch, self.amp_dtype)


def default_batch_size(device, height: int, width: int, cuda_batch_size: int = 32) -> int:
    """Windows per forward pass: ``cuda_batch_size`` on a GPU, ``CPU_BATCH_SIZES`` by input size on a CPU."""
    if torch.device(device).type != "cpu":
        return int(cuda_batch_size)
    pixels = int(height) * int(width)
    for limit, size in CPU_BATCH_SIZES:
        if pixels <= limit:
            return size
    raise AssertionError("CPU_BATCH_SIZES ends with an infinite limit")


def configure_cpu_inference(num_threads: int | None = None) -> dict:
    """Process-wide settings that make CPU inference of a convnet fast; returns what was set.

    - glibc's malloc serves blocks above its mmap threshold (at most 32 MB) with fresh ``mmap``-ed
      pages, handed back on ``free``: every large activation of every forward pass is then
      page-faulted in and zeroed again, which at 480x640 costs about half of the forward time and
      makes bigger batches slower, not faster. Raising the threshold to 256 MB (and the trim
      threshold to 512 MB) lets the heap reuse those blocks. Larger arrays (whole-scan DDFs) are
      still mmap-ed and returned to the system when freed.
    - ``num_threads``: intra-op threads (``torch.set_num_threads``); None keeps torch's default
      (one per core).

    Call it from a script's ``main`` (or the challenge entry point), never at import. A no-op for
    malloc where the C library is not glibc.
    """
    done = {}
    if num_threads is not None:
        if int(num_threads) < 1:
            raise InputError(f"num_threads={num_threads!r}: expected a positive integer")
        torch.set_num_threads(int(num_threads))
        done["num_threads"] = int(num_threads)
    libc_name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(libc_name) if libc_name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        mallopt = None
    if mallopt is not None:
        ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES) == 1
        ok = mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES) == 1 and ok
        done["malloc_tuned"] = ok
    return done


def prepare_model_for_inference(model: torch.nn.Module, device) -> torch.nn.Module:
    """``model`` on ``device`` in eval mode, made faster for inference on a CPU.

    On a CPU: batch normalisations are folded into the preceding convolutions
    (``torch.fx.experimental.optimization.fuse``; outputs change by float rounding only, ~1e-7
    relative) and the weights are made channels-last, the layout oneDNN's convolutions (depthwise
    ones above all) run fastest in; with the weights in that layout the convolutions pick it for
    their outputs too, whatever the input's layout. A network that torch.fx cannot trace (data-
    dependent control flow) is kept unfused. Only for models used for inference: the result is a
    different module (a ``GraphModule``) whose state dict is not the checkpoint's.
    """
    model = model.to(device).eval()
    if torch.device(device).type != "cpu":
        return model
    try:
        from torch.fx.experimental.optimization import fuse

        model = fuse(model)
    except Exception as error:  # noqa: BLE001 - any tracing failure just means no fusion
        log.debug("conv-bn fusion skipped for %s: %s", type(model).__name__, error)
    return model.to(memory_format=torch.channels_last)


# --------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------


def image_points_mm(scale, height: int, width: int) -> torch.Tensor:
    """The four corners of the ORIGINAL image in image mm, float64 [4, 4] (``S @ image_corners``)."""
    return torch.as_tensor(np.array(scale), dtype=torch.float64) @ tf.image_corners((height, width)).double()


def network_frames(frames, settings: PredictionSettings, height: int, width: int):
    """The frames the network reads: ``frames`` down-sampled by ``settings.downsample``.

    ``frames`` is uint8 [N, H, W] at the original size ``height`` x ``width`` (then down-sampled)
    or already at the network's size (then returned as is, e.g. from a down-sampled cache).
    """
    shape = tuple(frames.shape[1:])
    small = settings.network_frame_size(height, width)
    if shape == (height, width):
        return downsample_frames(frames, settings.downsample) if settings.downsample > 1 else frames
    if shape == small:
        return frames
    raise InputError(f"frames of size {shape} fit neither the original size {(height, width)} nor the "
                     f"network's {small} (downsample={settings.downsample})")


def predict_transforms(model, frames, settings: PredictionSettings, scale, device, *, height: int | None = None,
                       width: int | None = None, progress: bool = False, measurements: dict | None = None):
    """Predict every frame's global and local transform of a scan.

    Args:
        model: the network (any mode; evaluated in eval mode, its mode restored afterwards).
        frames: uint8 [N, H, W] numpy array or tensor, original size (or the network's size when
            ``height``/``width`` give the original one).
        settings: ``PredictionSettings`` of the checkpoint.
        scale: [4, 4] ``S`` of the ORIGINAL frames (pixel -> image mm).
        device: where the network runs.
        height, width: the original frame size; default ``frames``' own.
        progress: a progress bar over windows.
        measurements: a ``seq_flow`` network's ``measure_scan`` of the scan, already made (``--feature_cache``):
            the frames are then not read, only counted (``predict_scan_transforms``).
    Returns:
        ``(global [N-1, 4, 4], local [N-1, 4, 4], seconds)``: float64 CPU tensors ``T_{0<-i}`` and
        ``T_{i-1<-i}`` for i = 1..N-1, and the wall time from ``frames`` to both (down-sampling,
        every forward pass, chaining).
    Raises:
        ValueError: fewer frames than a window, or non-finite network outputs.
    """
    height = int(frames.shape[1]) if height is None else int(height)
    width = int(frames.shape[2]) if width is None else int(width)
    num_frames = int(frames.shape[0])
    if num_frames < settings.num_samples:
        raise InputError(f"a scan of {num_frames} frames is shorter than one window of NUM_SAMPLES="
                         f"{settings.num_samples} frames")
    device = torch.device(device)
    points = image_points_mm(scale, height, width)
    batch_size = settings.resolved_batch_size(device, height, width)
    was_training = model.training
    model.eval()
    restore_pixel_size = use_scan_pixel_size(model, scale, settings.downsample)
    try:
        start = time.perf_counter()
        inputs = network_frames(frames, settings, height, width) if measurements is None else frames
        global_pred, local_pred = predict_scan_transforms(
            model, inputs, num_samples=settings.num_samples, num_pred=settings.num_pred,
            pred_type=settings.pred_type, image_points_mm=points, device=device, batch_size=batch_size,
            amp_dtype=settings.torch_amp_dtype(device), progress=progress, window_pairs=settings.window_pairs,
            measurements=measurements)
        global_pred = torch.as_tensor(global_pred).to("cpu", torch.float64)  # a sync point on a GPU
        local_pred = torch.as_tensor(local_pred).to("cpu", torch.float64)
        seconds = time.perf_counter() - start
    finally:
        model.train(was_training)
        restore_pixel_size()
    expected = (num_frames - 1, 4, 4)
    for name, value in (("global", global_pred), ("local", local_pred)):
        if tuple(value.shape) != expected:
            raise AssertionError(f"predicted {name} transforms have shape {tuple(value.shape)}, expected {expected}")
    check_finite_transforms(global_pred, local_pred)
    return global_pred, local_pred, seconds


def use_scan_pixel_size(model, scale, downsample: int = 1):
    """Give a network that measures motion in pixels (``pixel_mm`` buffer, e.g. ``patch_flow``) the
    pixel size of the scan it predicts; returns a function that puts the trained value back.

    Such a network finds displacements in pixels and converts them to mm with ``pixel_mm``, which
    defaults to the training calibration's; a dataset with another ``S`` (the real PLUS scans,
    616x820 at other spacings) would otherwise get motions scaled by the ratio of the two. A no-op
    for other networks.
    """
    pixel_mm = getattr(model, "pixel_mm", None)
    if not isinstance(pixel_mm, torch.Tensor) or pixel_mm.shape != (2,):
        return lambda: None
    trained = pixel_mm.detach().clone()
    scale = np.asarray(scale, dtype=np.float64)
    with torch.no_grad():
        pixel_mm.copy_(torch.tensor([scale[0, 0] * downsample, scale[1, 1] * downsample]))

    def restore() -> None:
        with torch.no_grad():
            pixel_mm.copy_(trained)

    return restore


def frame_size_warning(model, trained_size, height: int, width: int) -> str | None:
    """A warning for frames of ``height`` x ``width`` when the network was trained on another size;
    None when the sizes match, when the checkpoint does not record ``trained_size`` (older ones), or
    for a network that measures motion in pixels of any frame (a ``pixel_mm`` buffer: ``patch_flow``).

    A network that regresses motion from the whole image (``efficientnet_b1``) runs on any size
    but has learned image content at one scale: its predictions on another size are not to be trusted.
    """
    if trained_size is None or (int(trained_size[0]), int(trained_size[1])) == (height, width):
        return None
    if isinstance(getattr(model, "pixel_mm", None), torch.Tensor):
        return None
    return (f"frames are {height}x{width} but the network was trained on {int(trained_size[0])}x"
            f"{int(trained_size[1])} frames; its predictions on another size are unreliable")


def check_finite_transforms(global_pred, local_pred, source: str = "prediction") -> None:
    """Raise ValueError naming the first frame whose predicted transform holds NaN or inf."""
    for name, value in (("global", global_pred), ("local", local_pred)):
        finite = torch.isfinite(torch.as_tensor(value)).reshape(len(value), -1).all(dim=1)
        if not bool(finite.all()):
            frame = int((~finite).nonzero()[0, 0]) + 1  # row k holds frame k + 1
            raise InputError(f"{source}: the {name} transform of frame {frame} holds NaN or inf "
                             f"({int((~finite).sum())} of {len(finite)} frames); nothing is written for it")


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)  # eq would compare tensors elementwise
class ScanResult:
    """One scan's prediction and evaluation.

    Attributes:
        ref: where the scan's files are.
        protocol: ``scan_protocol(ref.name)``.
        frame_size: ``(H, W)`` of the original frames, pixels.
        landmarks: int64 [K, 3] or None (no landmark file).
        global_true, local_true, global_pred, local_pred: float64 CPU [N-1, 4, 4] image-mm transforms.
        errors, identity_errors: ``{'GPE', 'GLE', 'LPE', 'LLE'}`` -> mm (NaN where absent).
        scores: ``metrics.normalised_scores`` of the two.
        frame_errors_global, frame_errors_local: float64 numpy [N-1], mean pixel error of each frame
            (mm); their means are GPE and LPE, the global one is the drift curve.
        runtime_s: seconds to predict all positions (see the module docstring).
        ddf_s: seconds to produce the four predicted DDFs, NaN where they were not produced.
        batch_size: windows per forward pass used.
        extra_columns: method-specific figures appended to the scan's row of ``scores.csv`` (e.g. the
            out-of-plane sign counts).
        move_sign_counts: int64 [S, 2] or None: per move of the true motion (``utils.moves``), the pairs
            given the right out-of-plane direction and those given one (for the accuracy's interval).
    """

    ref: ScanRef
    protocol: str
    frame_size: tuple[int, int]
    landmarks: np.ndarray | None
    global_true: torch.Tensor
    local_true: torch.Tensor
    global_pred: torch.Tensor
    local_pred: torch.Tensor
    errors: dict
    identity_errors: dict
    scores: dict
    frame_errors_global: np.ndarray
    frame_errors_local: np.ndarray
    runtime_s: float
    ddf_s: float = math.nan
    batch_size: int = 0
    extra_columns: dict = dataclasses.field(default_factory=dict)
    move_sign_counts: np.ndarray | None = None

    @property
    def num_frames(self) -> int:
        return int(self.global_true.shape[0]) + 1

    @property
    def stem(self) -> str:
        """``<subject folder>_<scan>``: file names of this scan's outputs."""
        return f"{self.ref.subject_folder}_{self.ref.name}"

    def row(self) -> dict:
        """The scan's row of the per-scan table (``metrics.scan_row`` plus scan facts)."""
        height, width = self.frame_size
        return metrics.scan_row(
            self.ref.subject_folder, self.ref.name, self.errors, self.identity_errors, self.runtime_s,
            key=self.ref.key, protocol=self.protocol, num_frames=self.num_frames, height=height, width=width,
            num_landmarks=0 if self.landmarks is None else len(self.landmarks),
            frames_per_s=(self.num_frames - 1) / self.runtime_s if self.runtime_s > 0 else math.nan,
            ddf_s=self.ddf_s, batch_size=self.batch_size, **self.extra_columns)

    def corners(self, scale) -> tuple[np.ndarray, np.ndarray]:
        """Image corners of every frame (frame 0 included) in frame 0's image mm: true and predicted
        float64 [N, 3, 4], corners in ``image_corners`` order."""
        points = image_points_mm(scale, *self.frame_size)
        first = points[None, :3]
        true = torch.cat([first, tf.transform_points(self.global_true, points)])
        pred = torch.cat([first, tf.transform_points(self.global_pred, points)])
        return true.numpy(), pred.numpy()


def score_transforms(global_true, local_true, global_pred, local_pred, scale, landmarks, height: int, width: int):
    """Errors, identity errors, scores and per-frame errors of a scan from its transforms.

    Exactly ``metrics.scan_errors_from_transforms`` / ``identity_errors_from_transforms`` (the same
    functions, GPE and LPE as means of the per-frame terms), keeping the per-frame terms.

    Returns:
        ``(errors, identity_errors, scores, frame_errors_global, frame_errors_local)``.
    """
    frame_global = metrics.field_errors_from_transforms(global_true, global_pred, scale, height, width)
    frame_local = metrics.field_errors_from_transforms(local_true, local_pred, scale, height, width)
    errors = {"GPE": float(frame_global.mean()), "GLE": math.nan, "LPE": float(frame_local.mean()), "LLE": math.nan}
    if landmarks is not None:
        errors["GLE"] = float(metrics.landmark_errors_from_transforms(
            global_true, global_pred, scale, landmarks, height, width).mean())
        errors["LLE"] = float(metrics.landmark_errors_from_transforms(
            local_true, local_pred, scale, landmarks, height, width).mean())
    identity = metrics.identity_errors_from_transforms(global_true, local_true, scale, landmarks, height, width)
    scores = metrics.normalised_scores(errors, identity)
    return errors, identity, scores, frame_global.cpu().numpy(), frame_local.cpu().numpy()


def true_transforms(tforms, calibration: Calibration):
    """Ground-truth ``(global, local)`` float64 [N-1, 4, 4] from tracker poses [N, 4, 4] (tool -> camera)."""
    tforms = torch.as_tensor(np.asarray(tforms), dtype=torch.float64)
    calib_r_t = torch.as_tensor(np.array(calibration.calib_R_T), dtype=torch.float64)
    return tf.global_transforms(tforms, calib_r_t), tf.local_transforms(tforms, calib_r_t)


def evaluate_scan(model, settings: PredictionSettings, ref: ScanRef, calibration: Calibration, device, *,
                  scan: Scan | None = None, frames=None, progress: bool = False,
                  measurements: dict | None = None) -> ScanResult:
    """Predict one scan with ``model`` and score it against its tracker poses.

    Args:
        model: the network (see ``predict_transforms``).
        settings: ``PredictionSettings.from_options(checkpoint["options"])``.
        ref: the scan (``find_scans``); read with ``read_scan`` unless ``scan`` is given.
        calibration: the dataset's calibration (original frame size).
        device: where the network runs.
        scan: the scan already read (frames, poses, landmarks), to skip reading.
        frames: the network's input frames already read (original or network size, e.g. from a
            down-sampled cache); then only the poses and landmarks are read from ``ref``.
        progress: a progress bar over windows.
        measurements: the scan's ``measure_scan`` by the ``seq_flow`` network, already made (``--feature_cache``
            validation): then the frames are not read at all.
    Returns:
        ``ScanResult``; the prediction is checked finite (ValueError otherwise) before anything is
        scored, so a caller that writes after this call never writes a NaN prediction.
    """
    if scan is None:
        if frames is None and measurements is None:
            scan = read_scan(ref)
        else:
            scan = _read_poses_only(ref, frames)
    height, width = scan.frame_size
    source_frames = scan.frames if frames is None else frames
    global_pred, local_pred, seconds = predict_transforms(
        model, source_frames, settings, calibration.scale, device, height=height, width=width, progress=progress,
        measurements=measurements)
    return score_prediction(ref, scan, calibration, global_pred, local_pred, seconds,
                            batch_size=settings.resolved_batch_size(device, height, width))


def score_prediction(ref: ScanRef, scan: Scan, calibration: Calibration, global_pred, local_pred, seconds: float, *,
                     batch_size: int = 0) -> ScanResult:
    """Score a scan's predicted transforms, whatever predicted them (a network, speckle tracking, ...).

    Args:
        ref: the scan's files; scan: its poses and landmarks (``read_scan``; only the frames' shape
            is used).
        calibration: the dataset's calibration (original frame size).
        global_pred, local_pred: float64 [N-1, 4, 4] ``T_{0<-i}`` and ``T_{i-1<-i}`` (image mm).
        seconds: the method's time to predict all positions of the scan.
        batch_size: windows per forward pass, where that means something (0 otherwise).
    Returns:
        ``ScanResult``. Raises ValueError on a non-finite prediction (before anything is scored) and
        AssertionError on shapes that are not [N-1, 4, 4].
    """
    height, width = scan.frame_size
    global_pred = torch.as_tensor(global_pred).to("cpu", torch.float64)
    local_pred = torch.as_tensor(local_pred).to("cpu", torch.float64)
    expected = (scan.num_frames - 1, 4, 4)
    for name, value in (("global", global_pred), ("local", local_pred)):
        if tuple(value.shape) != expected:
            raise AssertionError(f"predicted {name} transforms have shape {tuple(value.shape)}, expected {expected}")
    check_finite_transforms(global_pred, local_pred, source=ref.key)
    global_true, local_true = true_transforms(scan.tforms, calibration)
    errors, identity, scores, frame_global, frame_local = score_transforms(
        global_true, local_true, global_pred, local_pred, np.array(calibration.scale), scan.landmarks, height, width)
    return ScanResult(ref, scan_protocol(ref.name), (height, width), scan.landmarks, global_true, local_true,
                      global_pred, local_pred, errors, identity, scores, frame_global, frame_local, seconds,
                      batch_size=batch_size)


def _read_poses_only(ref: ScanRef, frames=None) -> Scan:
    """A ``Scan`` holding the poses and landmarks of ``ref`` and a zero-copy stand-in for frames
    (only their shape is used), so cached frames are not read twice (``frames``: those, whose
    number is checked; None where nothing of the frames is needed)."""
    with ScanFile(ref) as scan_file:
        tforms = scan_file.read_tforms()
        num_frames, (height, width) = scan_file.num_frames, scan_file.frame_size
    if frames is not None and int(frames.shape[0]) != num_frames:
        raise InputError(f"{ref.frames_path}: {num_frames} frames, but {int(frames.shape[0])} were given")
    landmarks = None
    if ref.landmark_path is not None:
        landmarks = read_landmarks(ref.landmark_path, ref.name, num_frames, height, width)
    shape_only = np.broadcast_to(np.zeros((), np.uint8), (num_frames, height, width))
    return Scan(ref.name, ref.subject, ref.key, shape_only, tforms, landmarks)


# --------------------------------------------------------------------------------------------
# Tables, metrics.h5, printing
# --------------------------------------------------------------------------------------------


def results_table(results: Sequence[ScanResult]) -> pd.DataFrame:
    """Per-scan table: ``metrics.ROW_COLUMNS`` then key, protocol, frames, landmarks, rate, ddf_s, batch."""
    return metrics.results_table([result.row() for result in results])


def summary_table(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over scans of every figure: a row ``all``, then one per protocol when any scan's
    name says its protocol (``rotation``, ``sweep``). Index ``group``; see ``metrics.summarise``."""
    parts = [metrics.summarise(table)]
    if len(table) and "protocol" in table.columns and (table["protocol"] != PROTOCOL_OTHER).any():
        parts.append(metrics.summarise(table, by="protocol"))
    summary = pd.concat(parts)
    summary.index.name = "group"
    return summary


def write_metrics_h5(path, table: pd.DataFrame, results: Sequence[ScanResult] = (), attrs: Mapping | None = None):
    """Write ``metrics.h5`` atomically: the official datasets and ours.

    Layout:
        ``GPE``, ``GLE``, ``LPE``, ``LLE``, ``time_elapsed``: float64 [num_scans], the official
        harness's datasets (mm; seconds), in the order of ``key``. NaN = absent (no landmarks).
        ``key``, ``subject``, ``scan``, ``protocol``: strings [num_scans].
        ``scans/<column>``: every numeric column of ``table`` (identity errors, scores, ...).
        ``frame_errors/<key>/global``, ``.../local``: float64 [N-1] per-frame mean pixel errors (mm),
        the drift curves (from ``results``).
        root attributes: ``attrs`` (e.g. checkpoint, data path, split, device) and the units.
    """
    string = h5py.string_dtype("utf-8")
    with atomic_path(path) as tmp, writing_hdf5(tmp) as file:
        for name in ("GPE", "GLE", "LPE", "LLE"):
            file.create_dataset(name, data=table[name].to_numpy(np.float64))
        file.create_dataset("time_elapsed", data=table["runtime_s"].to_numpy(np.float64))
        for name in ("key", "subject", "scan", "protocol"):
            if name in table.columns:
                file.create_dataset(name, data=np.array(table[name].astype(str).tolist(), dtype=object), dtype=string)
        group = file.create_group("scans")
        for name in table.columns:
            if pd.api.types.is_numeric_dtype(table[name]):
                group.create_dataset(name, data=table[name].to_numpy(np.float64))
        frames = file.create_group("frame_errors")
        for result in results:
            scan_group = frames.create_group(result.ref.key)
            scan_group.create_dataset("global", data=result.frame_errors_global)
            scan_group.create_dataset("local", data=result.frame_errors_local)
        file.attrs["units"] = "errors in mm, time_elapsed and *_s in seconds, scores without unit; NaN = absent"
        for key, value in (attrs or {}).items():
            file.attrs[key] = "" if value is None else (value if isinstance(value, (int, float)) else str(value))
    return Path(path)


def _cell(value, digits: int = 3) -> str:
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "absent"
    return f"{value:.{digits}f}"


def format_tables(table: pd.DataFrame, summary: pd.DataFrame) -> str:
    """The per-scan and summary tables as text (mm, seconds; ``absent`` where there are no landmarks,
    ``undefined`` for the score of a scan without motion)."""
    scan_columns = [("GPE", 3), ("GLE", 3), ("LPE", 3), ("LLE", 3), ("final", 3), ("runtime_s", 2),
                    ("frames_per_s", 1)]
    lines = ["Per scan: errors (mm), final score (1 = perfect, 0 = as good as no motion), runtime (s)"]
    rows = [["subject", "scan", "protocol", "frames"] + [name for name, _ in scan_columns]]
    for record in table.to_dict("records"):
        still = metrics.without_motion({name: record[name + metrics.IDENTITY_SUFFIX] for name in metrics.ERROR_NAMES})
        rows.append([str(record["subject"]), str(record["scan"]), str(record.get("protocol", "")),
                     str(record.get("num_frames", ""))]
                    + ["undefined" if name == "final" and still else _cell(record.get(name, math.nan), digits)
                       for name, digits in scan_columns])
    lines += _align(rows)
    lines.append("")
    lines.append("Summary over scans: mean +- std")
    figures = [("GPE", 3), ("GLE", 3), ("LPE", 3), ("LLE", 3), ("final", 3), ("global", 3), ("local", 3),
               ("runtime_s", 2)]
    rows = [["group", "scans"] + [name for name, _ in figures]]
    for group, record in summary.iterrows():
        cells = []
        for name, digits in figures:
            mean, std = record[f"{name}_mean"], record[f"{name}_std"]
            cells.append(_cell(mean, digits) if math.isnan(std) or math.isnan(mean)
                         else f"{mean:.{digits}f} +- {std:.{digits}f}")
        rows.append([str(group), str(int(record["num_scans"]))] + cells)
    lines += _align(rows)
    return "\n".join(lines)


def _align(rows) -> list[str]:
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    return ["  ".join(cell.rjust(width) if k >= 2 else cell.ljust(width) for k, (cell, width) in
                      enumerate(zip(row, widths))).rstrip() for row in rows]


# --------------------------------------------------------------------------------------------
# Plots, DDF files, the output folder
# --------------------------------------------------------------------------------------------


def plot_scan(result: ScanResult, scale, folder) -> list[Path]:
    """Write ``<stem>_trajectory.png`` (frame corners, truth vs prediction, 3D) and ``<stem>_drift.png``
    (global error of each frame against its index) into ``folder``; returns the two paths."""
    from utils.plotting import plot_corner_trajectories, plot_drift  # matplotlib only where plots are made

    folder = Path(folder)
    corners_true, corners_pred = result.corners(scale)
    title = f"{result.ref.subject_folder} {result.ref.name}"
    trajectory = folder / f"{result.stem}_trajectory.png"
    drift = folder / f"{result.stem}_drift.png"
    plot_corner_trajectories(corners_true, corners_pred, trajectory, title=title,
                             every=max(1, result.num_frames // 40))
    plot_drift(result.frame_errors_global, drift, title=f"{title}: global pixel error per frame",
               ylabel="mean pixel error (mm)")
    return [trajectory, drift]


def write_prediction_ddfs(result: ScanResult, scale, path, fmt: str = "h5") -> float:
    """Stream the scan's four predicted DDFs (GP, GL, LP, LL) to ``path`` in constant memory
    (``utils.Transf2DDFs.write_ddfs``); returns the seconds taken, also stored in ``result.ddf_s``."""
    from utils.Transf2DDFs import write_ddfs

    height, width = result.frame_size
    start = time.perf_counter()
    write_ddfs(path, result.global_pred, result.local_pred, np.array(scale), result.landmarks, width, height, fmt=fmt)
    result.ddf_s = time.perf_counter() - start
    return result.ddf_s


@contextlib.contextmanager
def replaced_folder(path):
    """Yield an empty staging folder beside ``path``; on success it replaces ``path`` (whose old
    contents are deleted), on any error it is deleted and ``path`` is left as it was.

    Refuses (InputError) to replace an existing ``path`` that is neither empty nor marked as an
    earlier result of this module (``RESULTS_MARKER``), so a mistyped ``--out`` never deletes a
    folder of other files. The staging folders of killed runs are removed first; a run killed in
    the instant between moving the old result aside and putting the new one in place has its old
    result put back.
    """
    path = Path(path).absolute()
    if path.exists():
        if not path.is_dir():
            raise InputError(f"{path} exists and is not a folder; choose another output folder")
        if any(path.iterdir()) and not (path / RESULTS_MARKER).exists():
            raise InputError(f"{path} holds files that are not results of generate_DDF.py (no {RESULTS_MARKER}); "
                             "refusing to replace it: choose another output folder or empty it")
    with atomic.atomic_folder(path) as staging:
        (staging / RESULTS_MARKER).write_text("written by generate_DDF.py; this folder is replaced on re-runs\n")
        yield staging

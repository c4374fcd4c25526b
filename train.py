"""Train a network that predicts the probe's motion between ultrasound frames (TUS-REC baseline, done properly).

Usage::

    python train.py --preset fast_cpu --DATA_PATH data/demo          # one process, CPU or one GPU
    torchrun --nproc_per_node 2 train.py --preset baseline           # DDP (gloo on CPU, nccl on GPU)
    python train.py --resume results/003-fast_cpu/last.pt            # continue exactly where it stopped
    python train.py --init_weights TUS-REC2024_model/model_weights   # start from released weights

Options: ``options/train_options.py`` (defaults = the official baseline's), presets in
``options/presets/``; precedence defaults < preset < command line; the baseline's flags
(``--NUM_SAMPLES``, ``--PRED_TYPE``, ...) work as aliases. Each run writes ``results/<NNN>-<name>/``:
``options.yaml`` (the resolved options, a valid preset), ``folds.json``, ``log.txt``, ``metrics.csv``
(a row per epoch), ``curves.png``, TensorBoard events in ``tb/``, and the checkpoints ``last.pt`` and
``best.pt`` (lowest validation point distance, or whole-scan GPE with ``--best_metric val_GPE``).

What one step does, as the baseline: a batch of windows of ``NUM_SAMPLES`` frames (``/255``) goes
through the network; its output per pair ``(j, i)`` of ``pair_samples(NUM_SAMPLES, NUM_PRED)`` is
turned into the label type (``LABEL_TYPE``) and compared with the label from the tracked poses by
MSE. The point distance (mm between the image corners moved by the predicted and by the true
transform) is reported for training and validation; every ``val_scan_every`` epochs the whole
validation scans are predicted and scored with the official GPE/LPE.

A sequence model (``--preset seq_cpu``: ``seq_flow``, ``--window_pairs consecutive``) predicts the
local transform of every frame of its window instead; ``--accumulated_loss_weight`` adds the error of
those transforms chained from the window's first frame (drift), and validation reports it
(``val_window_drift``). Stage 2 of its training starts from a 2-frame run:
``--init_weights results/<NNN>-cpu_hour/last.pt`` loads a ``patch_flow`` checkpoint into its encoder.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import logging
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

import models
from options.core import build_parser, load_preset, options_from_dict, options_to_dict, write_options
from options.train_options import TrainOptions
from utils import transform as tf
from utils.atomic import atomic_path
from utils.augmentation import Mirror
from utils.calibration import load_calibration
from utils.challenge_data import CALIB_FILE, ScanFile, check_scans, find_scans
from utils.checkpoint import (
    load_checkpoint,
    load_model_state,
    load_model_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unwrap_model,
)
from utils.cli import Interrupted, StopSignals, ignore_stop_signals, run_cli
from utils.errors import InputError
from utils.evaluation import PredictionSettings, configure_cpu_inference, evaluate_scan, image_points_mm
from utils.plotting import plot_training_curves
from utils.prediction import map_tensors
from utils.run_dir import make_run_dir
from utils.training_data import (
    MEASUREMENT_FOLDER,
    EpochSampler,
    FrameWindowDataset,
    MeasuredWindowDataset,
    cache_downsampled_scans,
    load_measurements,
    measurement_cache_path,
    read_folds,
    read_scan_frames,
    resolve_data_root,
    save_measurements,
    scans_of_folds,
    subject_folds,
    write_folds,
)

log = logging.getLogger("train")

# Options that may change when a run is resumed: where things are, how long and how often.
# Everything else (model, data sampling, optimiser) must stay as the checkpoint says, or the
# continuation would not be the same run.
RESUMABLE_OVERRIDES = frozenset({
    "num_epochs", "max_steps", "device", "num_workers", "freq_info", "freq_save", "val_fre",
    "log_every_steps", "save_every_steps", "val_scan_every", "data_path", "calib_file",
    "landmark_path", "cache_dir", "inference_batch_size", "amp",
})

# Per-DOF validation errors (mean absolute error of each pair's rotation angles in degrees and
# translations in mm, ``tf.DOF_NAMES``) next to no motion's (the mean absolute true value): which
# motion a model has learned and which not. ``val_oop_sign_acc``: how often the predicted
# out-of-plane displacement of the image centre has the true direction (NaN: none predicted).
DOF_COLUMNS = tuple(f"val_{dof}" for dof in tf.DOF_NAMES) + tuple(f"val_{dof}_identity" for dof in tf.DOF_NAMES)
METRIC_COLUMNS = ("epoch", "step", "lr", "train_loss", "train_dist", "val_loss", "val_dist",
                  "val_GPE", "val_LPE", "val_GPE_identity", "val_LPE_identity") + DOF_COLUMNS + (
                  "val_oop_sign_acc", "val_window_drift", "val_window_drift_identity", "epoch_s", "samples_per_s",
                  "data_wait_fraction")
# Out-of-plane displacements of the image centre below this (mm) have no direction worth scoring.
SIGN_MIN_MM = 0.05


# --------------------------------------------------------------------------------------------
# Geometry of one batch: labels from poses, predictions in the label type, point distances
# --------------------------------------------------------------------------------------------


@dataclass
class PairGeometry:
    """The baseline's LabelTransform / PredictionTransform / PointTransform for one set of pairs.

    Attributes:
        pairs: [M, 2] ``(j, i)`` frame pairs within a window (``tf.pair_samples``).
        pred_type, label_type: the network output and label types.
        calib_R_T: [4, 4] float64 ``C`` on the device.
        image_points_mm: [4, P] float64 reference points (the image corners of the ORIGINAL frame
            size) in image mm; labels stay in this frame even when the network sees down-sampled
            frames, so predictions mean the same thing at any input resolution.
        loss_weights: [D] float32 weight of each value of a ``parameter`` label in the MSE
            (``label_loss_weights``), None for the baseline's plain MSE.
        loss_kind: ``"mse"`` (the baseline's) or ``"l1"``: the mean absolute error, each value's
            weighted by the square root of its MSE weight (so ``label_norm`` measures both in units
            of each DOF's spread); or ``"l1_oop_mse"`` (``parameter`` labels): ``"l1"`` on the in-plane
            DOFs, ``"mse"`` on the out-of-plane ones.
        accumulated_weight: weight of ``accumulated_error_ratio`` in the loss (consecutive pairs only;
            0 = off).
    """

    pairs: torch.Tensor
    pred_type: str
    label_type: str
    calib_R_T: torch.Tensor
    image_points_mm: torch.Tensor
    loss_weights: torch.Tensor | None = None
    loss_kind: str = "mse"
    accumulated_weight: float = 0.0

    @property
    def num_pairs(self) -> int:
        return int(self.pairs.shape[0])

    @property
    def consecutive(self) -> bool:
        """Whether the pairs are a window's consecutive ones, (0, 1), (1, 2), ... (``tf.consecutive_pairs``)."""
        chain = torch.arange(self.num_pairs, device=self.pairs.device)
        return bool((self.pairs[:, 0] == chain).all() and (self.pairs[:, 1] == chain + 1).all())

    def pred_dim(self) -> int:
        return tf.type_dim(self.pred_type, self.image_points_mm.shape[1], self.num_pairs)

    def labels(self, tforms: torch.Tensor) -> torch.Tensor:
        """Labels [B, M, ...] (float32) from poses [B, n, 4, 4]; computed in float64, where the
        difference of two tracker poses hundreds of mm from the camera keeps its precision."""
        relative = tf.relative_transforms(tforms.double(), self.pairs, self.calib_R_T)
        return tf.matrix_to_label(relative, self.label_type, self.image_points_mm).float()

    def predictions(self, outputs: torch.Tensor) -> torch.Tensor:
        """Network outputs [B, M*D] -> [B, M, ...] in the label type (float32)."""
        return tf.prediction_to_label(outputs.float(), self.pred_type, self.label_type, self.num_pairs,
                                      self.image_points_mm.float())

    def points(self, values: torch.Tensor) -> torch.Tensor:
        """Label-type values [B, M, ...] -> reference points after the transform [B, M, 3, P] (mm)."""
        points_mm = self.image_points_mm.to(values.dtype)
        if self.label_type == "point":
            return values
        if self.label_type == "parameter":
            return tf.transform_points(tf.params_to_matrix(values), points_mm)
        return tf.transform_points(values, points_mm)

    def loss(self, predictions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss: the baseline's MSE, or the per-DOF weighted MSE of ``loss_weights``, or
        their L1 counterparts (``loss_kind``); plus ``accumulated_weight`` times
        ``accumulated_error_ratio`` when it is on."""
        loss = self.value_losses(predictions, labels).mean()
        if self.accumulated_weight > 0:
            loss = loss + self.accumulated_weight * self.accumulated_error_ratio(predictions, labels)
        return loss

    def accumulated_points(self, values: torch.Tensor) -> torch.Tensor:
        """Consecutive-pair values [B, L-1, ...] -> the reference points placed in the window's first
        frame by the accumulated transforms ``T_{0<-i} = T_{0<-1} ... T_{i-1<-i}``: [B, L-1, 3, P] mm."""
        points = self.image_points_mm.to(values.dtype)
        return tf.transform_points(tf.chain_local_transforms(tf.label_to_matrix(values, self.label_type, points)), points)

    def accumulated_distances(self, predictions: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per window [B]: the mean distance (mm) between the reference points placed by the accumulated
        predicted and true transforms, and no motion's (the true points from where they start): the
        drift a window's errors add up to."""
        true = self.accumulated_points(labels)
        error = torch.linalg.vector_norm(self.accumulated_points(predictions) - true, dim=-2).flatten(1).mean(dim=1)
        start = self.image_points_mm.to(true.dtype)[:3]
        identity = torch.linalg.vector_norm(true - start, dim=-2).flatten(1).mean(dim=1)
        return error, identity

    def accumulated_error_ratio(self, predictions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The batch's accumulated point error over no motion's (about 1 for a network that predicts no
        motion, whatever the scale of the motion): the loss term that penalises drift within a window,
        not only each pair's error. The denominator carries no gradient."""
        if not self.consecutive:
            raise AssertionError("accumulated losses need consecutive pairs (options validation refuses others)")
        error, identity = self.accumulated_distances(predictions, labels)
        return error.mean() / identity.mean().detach().clamp_min(1e-6)

    def value_losses(self, predictions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of every label value, the shape of ``labels``; ``loss`` is their mean."""
        difference = predictions - labels
        weights = torch.ones(difference.shape[-1], device=difference.device) if self.loss_weights is None \
            else self.loss_weights
        if self.loss_kind == "mse":
            return difference.pow(2) * weights
        if self.loss_kind == "l1":
            return difference.abs() * weights.sqrt()
        # l1_oop_mse: two frames cannot tell which way the plane moved out of itself, so a network that
        # sees a direction only as likelier should not commit to it. The squared error is least for
        # the mean over both directions, (2p - 1) times the size, which is also what keeps the error of
        # the chained transforms least; the absolute error's least is the likelier direction in full,
        # and whole half-swings of a fan predicted the wrong way add up over a scan (issue 12's note).
        # The in-plane DOFs keep the absolute error: a few pairs beyond the search do not drive them.
        out_of_plane = torch.zeros(difference.shape[-1], dtype=torch.bool, device=difference.device)
        out_of_plane[list(tf.OUT_OF_PLANE_DOFS)] = True
        return torch.where(out_of_plane, difference.pow(2) * weights, difference.abs() * weights.sqrt())

    def dof_errors(self, predictions: torch.Tensor, labels: torch.Tensor) -> dict:
        """Per-DOF sums over the batch's pairs, for ``evaluate``: absolute errors and absolute true
        values (no motion's errors) of ``tf.dof_values`` (degrees, mm), the number of pairs, and the
        out-of-plane direction of the image centre (right, predicted, scorable pairs)."""
        points = self.image_points_mm.to(torch.float64)
        predicted = tf.label_to_matrix(predictions.double(), self.label_type, points)
        true = tf.label_to_matrix(labels.double(), self.label_type, points)
        pred_dofs, true_dofs = tf.dof_values(predicted), tf.dof_values(true)
        centre = points.mean(dim=1, keepdim=True)  # the image centre, homogeneous [4, 1]
        pred_z = tf.transform_points(predicted, centre)[..., 2, 0]
        true_z = tf.transform_points(true, centre)[..., 2, 0]
        scorable = (true_z.abs() > SIGN_MIN_MM) & (pred_z != 0)
        return {
            "abs_error": (pred_dofs - true_dofs).abs().reshape(-1, 6).sum(dim=0),
            "abs_true": true_dofs.abs().reshape(-1, 6).sum(dim=0),
            "pairs": float(true_dofs.reshape(-1, 6).shape[0]),
            "sign_right": float(((pred_z * true_z > 0) & scorable).sum()),
            "sign_scored": float(scorable.sum()),
        }

    def point_distance(self, predictions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean distance (mm) between predicted and true reference points, over batch, pairs and points."""
        difference = self.points(predictions) - self.points(labels)
        return torch.linalg.vector_norm(difference, dim=-2).mean()


# --------------------------------------------------------------------------------------------
# Distributed set-up (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)
# --------------------------------------------------------------------------------------------


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, distributed: Distributed) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        if distributed.enabled:
            device = torch.device("cuda", distributed.local_rank)  # one GPU per process
        torch.cuda.set_device(device)
    return device


def init_distributed() -> Distributed:
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Distributed()
    return Distributed(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))


def broadcast_object(value, distributed: Distributed):
    if not distributed.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sums(values: list[float], device: torch.device, distributed: Distributed) -> list[float]:
    if not distributed.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


# --------------------------------------------------------------------------------------------
# Logging, progress and the per-epoch table
# --------------------------------------------------------------------------------------------


def remove_logging() -> None:
    """Take this module's handlers off the root logger (a caller such as demo.py keeps its own)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_train_handler", False):
            root.removeHandler(handler)
            handler.close()


def setup_logging(run_dir: Path | None, distributed: Distributed) -> None:
    """Rank 0 logs to stdout and ``run_dir/log.txt``; other ranks only warnings.

    When the caller already logs to the console (``demo.py``), only the file handler is added, so
    lines are not printed twice.
    """
    remove_logging()
    root = logging.getLogger()
    root.setLevel(logging.INFO if distributed.is_main else logging.WARNING)
    formatter = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    console_taken = any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
                        for h in root.handlers)
    handlers = [] if console_taken else [logging.StreamHandler(sys.stdout)]
    if run_dir is not None and distributed.is_main:
        handlers.append(logging.FileHandler(run_dir / "log.txt", mode="a"))
    for handler in handlers:
        handler.setFormatter(formatter)
        handler._train_handler = True
        root.addHandler(handler)


class Progress:
    """A tqdm bar on a terminal; otherwise a log line every ``every`` steps with rate and ETA."""

    def __init__(self, total: int, description: str, every: int, enabled: bool, unit_samples: int):
        self.total, self.every, self.enabled = total, max(1, every), enabled
        self.unit_samples = unit_samples
        self.description = description
        self.start = time.perf_counter()
        self.done = 0
        self.bar = tqdm(total=total, desc=description, unit="step", leave=False, dynamic_ncols=True) \
            if enabled and sys.stdout.isatty() else None

    def update(self, loss: float, dist_mm: float) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4g}", dist=f"{dist_mm:.3f}mm")
        elif self.enabled and (self.done % self.every == 0 or self.done == self.total):
            elapsed = time.perf_counter() - self.start
            rate = self.done / elapsed
            eta = (self.total - self.done) / rate if rate > 0 else math.nan
            log.info("%s step %d/%d  loss %.4g  dist %.3f mm  %.1f samples/s  ETA %s", self.description, self.done,
                     self.total, loss, dist_mm, rate * self.unit_samples, format_seconds(eta))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(round(seconds))))


def append_metrics_row(path: Path, row: dict) -> None:
    """Append one epoch's row to ``metrics.csv`` (header written with the first row; a run resumed from
    a version with other columns keeps its file's)."""
    new_file = not path.exists()
    columns = list(METRIC_COLUMNS)
    if not new_file:
        with open(path, newline="") as handle:
            columns = next(csv.reader(handle), None) or columns
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        if new_file:
            writer.writeheader()
        writer.writerow({key: row.get(key, "") for key in columns})


def plot_curves(run_dir: Path) -> None:
    """Redraw ``curves.png`` from ``metrics.csv``: the picture a user looks at first."""
    import pandas as pd

    table = pd.read_csv(run_dir / "metrics.csv")
    if table.empty:
        return
    def curves(*names):
        return {name.replace("_", " "): table[name] for name in names if name in table and table[name].notna().any()}

    # The loss on a log scale: what the network is trained on, where a refinement of a good start
    # shows (the 6-DOF point distance hardly moves for a model that predicts in-plane motion only).
    loss_title = "loss (log scale)"
    panels = {loss_title: curves("train_loss", "val_loss"),
              "point distance of the reference points": curves("train_dist", "val_dist"),
              "whole validation scans": curves("val_GPE", "val_GPE_identity", "val_LPE", "val_LPE_identity")}
    # Each DOF's validation error over no motion's: below 1 the model has learned that motion.
    ratio_title = "validation error / no motion's, per DOF"
    panels[ratio_title] = {dof: table[f"val_{dof}"] / table[f"val_{dof}_identity"] for dof in tf.DOF_NAMES
                           if f"val_{dof}" in table and table[f"val_{dof}"].notna().any()}
    plot_training_curves(table["epoch"], {k: v for k, v in panels.items() if v}, run_dir / "curves.png",
                         title=f"{run_dir.name} (epoch 0: the untrained network)",
                         ylabels={ratio_title: "ratio (1 = no motion), log scale", loss_title: "loss"},
                         references={ratio_title: 1.0}, log_panels={loss_title, ratio_title})


# --------------------------------------------------------------------------------------------
# One epoch of training, one validation
# --------------------------------------------------------------------------------------------


def autocast_context(device: torch.device, options: TrainOptions):
    if device.type == "cuda" and options.amp:
        return torch.autocast("cuda", dtype=getattr(torch, options.amp_dtype))
    return contextlib.nullcontext()


def train_one_epoch(model, loader, optimizer, scheduler, scaler, geometry: PairGeometry, device: torch.device,
                    options: TrainOptions, state: dict, distributed: Distributed, description: str) -> dict:
    """Train over ``loader`` (already positioned for a resumed epoch); updates ``state`` in place.

    ``state`` holds ``step`` and ``batch_in_epoch``, a ``save`` callback for step checkpoints and
    ``stop`` (``StopSignals``: the epoch ends after the step during which Ctrl-C / SIGTERM came).
    Returns the epoch's mean loss and point distance over this process's batches, the time spent
    waiting for data and the number of samples. Stops early at ``options.max_steps``.
    """
    model.train()
    loss_sum = dist_sum = 0.0
    batches = samples = 0
    data_wait = 0.0
    start = time.perf_counter()
    progress = Progress(len(loader), description, options.log_every_steps, distributed.is_main,
                        options.minibatch_size * distributed.world_size)
    iterator = iter(loader)
    while True:
        if options.max_steps is not None and state["step"] >= options.max_steps:
            break
        wait_start = time.perf_counter()
        try:
            frames, tforms, _ = next(iterator)
        except StopIteration:
            break
        data_wait += time.perf_counter() - wait_start
        frames = network_input(frames, device)
        tforms = tforms.to(device, non_blocking=True)
        labels = geometry.labels(tforms)
        with autocast_context(device, options):
            outputs = model(frames)
        predictions = geometry.predictions(outputs)
        loss = geometry.loss(predictions, labels)
        # One scalar per step is a CPU-GPU sync point; the baseline pays it too (loss.item()), and it
        # lets a diverging run stop at the step that diverged instead of after saving NaN weights.
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(
                f"loss is {loss_value} at step {state['step'] + 1} (epoch {state['epoch']}); stopping. "
                f"Lower --learning_rate (now {options.learning_rate}) or set --grad_clip."
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if options.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        with torch.no_grad():
            dist_mm = float(geometry.point_distance(predictions.detach(), labels))
        state["step"] += 1
        state["batch_in_epoch"] += 1
        state["last_losses"].append(loss_value)
        loss_sum += loss_value
        dist_sum += dist_mm
        batches += 1
        samples += tforms.shape[0]
        progress.update(loss_value, dist_mm)
        if options.save_every_steps and state["step"] % options.save_every_steps == 0:
            state["save"]("last.pt")
        if stop_requested(state.get("stop"), device, distributed):
            break
    progress.close()
    elapsed = time.perf_counter() - start
    totals = all_reduce_sums([loss_sum, dist_sum, batches, samples, data_wait, elapsed], device, distributed)
    loss_sum, dist_sum, batches, samples, data_wait, elapsed_all = totals
    return {
        "train_loss": loss_sum / batches if batches else math.nan,
        "train_dist": dist_sum / batches if batches else math.nan,
        "samples": int(samples),
        "data_wait_fraction": data_wait / elapsed_all if elapsed_all > 0 else math.nan,
        "epoch_s": elapsed,
        "batches": int(batches),
    }


def network_input(batch, device: torch.device):
    """A loader's batch as the network takes it: uint8 frames as floats / 255, or (``--feature_cache``)
    the dict of a network's cached measurements, moved to ``device``."""
    if isinstance(batch, dict):
        return {key: network_input(value, device) if isinstance(value, dict) else value.to(device, non_blocking=True)
                for key, value in batch.items()}
    return batch.to(device, non_blocking=True).float().div_(255)


def stop_requested(stop: StopSignals | None, device: torch.device, distributed: Distributed) -> bool:
    """Whether Ctrl-C / SIGTERM asked the run to stop (``stop`` None: nothing listens); under DDP,
    whether any rank was asked, so every rank stops after the same step (one rank leaving the
    collective calls would hang the others)."""
    requested = stop is not None and stop.requested
    if not distributed.enabled:
        return requested
    flag = torch.tensor([1.0 if requested else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


@torch.no_grad()
def evaluate(model, loader, geometry: PairGeometry, device: torch.device, options: TrainOptions,
             distributed: Distributed) -> dict:
    """Validation loss, point distance and per-DOF errors on fixed windows (the same every time).

    The loss and point distance are averaged per window; the per-DOF errors (``DOF_COLUMNS``) per
    pair, with the out-of-plane sign accuracy (``val_oop_sign_acc``).
    """
    model.eval()
    loss_sum = dist_sum = count = drift_sum = drift_identity_sum = 0.0
    dof_sums = torch.zeros(15, dtype=torch.float64)  # abs error [6], abs true [6], pairs, sign right, scored
    consecutive = geometry.num_pairs > 1 and geometry.consecutive
    for frames, tforms, _ in loader:
        frames = network_input(frames, device)
        labels = geometry.labels(tforms.to(device))
        with autocast_context(device, options):
            outputs = model(frames)
        predictions = geometry.predictions(outputs)
        batch = tforms.shape[0]
        per_window_loss = geometry.value_losses(predictions, labels).reshape(batch, -1).mean(dim=1)
        dofs = geometry.dof_errors(predictions, labels)
        dof_sums += torch.cat([dofs["abs_error"].cpu(), dofs["abs_true"].cpu(),
                               torch.tensor([dofs["pairs"], dofs["sign_right"], dofs["sign_scored"]], dtype=torch.float64)])
        per_window_dist = torch.linalg.vector_norm(
            geometry.points(predictions) - geometry.points(labels), dim=-2).reshape(batch, -1).mean(dim=1)
        loss_sum += float(per_window_loss.sum())
        dist_sum += float(per_window_dist.sum())
        count += batch
        if consecutive:
            drift, drift_identity = geometry.accumulated_distances(predictions.double(), labels.double())
            drift_sum += float(drift.sum())
            drift_identity_sum += float(drift_identity.sum())
    totals = all_reduce_sums([loss_sum, dist_sum, count, drift_sum, drift_identity_sum] + dof_sums.tolist(), device,
                             distributed)
    loss_sum, dist_sum, count, drift_sum, drift_identity_sum = totals[:5]
    abs_error, abs_true, (pairs, sign_right, sign_scored) = totals[5:11], totals[11:17], totals[17:20]
    row = {"val_loss": loss_sum / count if count else math.nan, "val_dist": dist_sum / count if count else math.nan}
    if consecutive:
        # The drift a window's errors add up to (corners placed from its first frame), against no motion's.
        row["val_window_drift"] = drift_sum / count if count else math.nan
        row["val_window_drift_identity"] = drift_identity_sum / count if count else math.nan
    for k, dof in enumerate(tf.DOF_NAMES):
        row[f"val_{dof}"] = abs_error[k] / pairs if pairs else math.nan
        row[f"val_{dof}_identity"] = abs_true[k] / pairs if pairs else math.nan
    row["val_oop_sign_acc"] = sign_right / sign_scored if sign_scored else math.nan
    return row


@torch.no_grad()
def evaluate_scans(model, scans, source_scans, read_factor: int, calibration, device: torch.device,
                   options: TrainOptions, measured: list | None = None) -> dict:
    """Official GPE/LPE (and their identity values) of whole scans, averaged over scans.

    ``scans`` are what the network reads (the originals, down-sampled by ``read_factor`` on reading,
    or a cache already down-sampled, ``read_factor`` 1); ``source_scans`` the original files, whose
    frame size and poses define the metrics. The same flow as ``generate_DDF.py``. ``measured``
    (``--feature_cache``): each scan's measurements kept for training (``MeasuredWindowDataset``),
    so whole-scan validation costs the temporal model and the metrics only, not the measuring.
    """
    settings = PredictionSettings.from_options(options)
    rows = []
    for index, (ref, source) in enumerate(zip(scans, source_scans)):
        if measured is not None:
            result = evaluate_scan(model, settings, source, calibration, device,
                                   measurements=as_batch_of_one(measured[index]))
        else:
            result = evaluate_scan(model, settings, source, calibration, device,
                                   frames=read_scan_frames(ref, read_factor))
        rows.append((result.errors["GPE"], result.errors["LPE"], result.identity_errors["GPE"],
                     result.identity_errors["LPE"]))
    means = np.mean(np.array(rows), axis=0) if rows else [math.nan] * 4
    return dict(zip(("val_GPE", "val_LPE", "val_GPE_identity", "val_LPE_identity"), map(float, means)))


# --------------------------------------------------------------------------------------------
# Set-up: options, data, model, optimiser
# --------------------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=True,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--resume", type=Path, default=None,
                        help="continue a run from its last.pt (options come from the checkpoint)")
    parser.add_argument("--init_weights", type=Path, default=None,
                        help="initialise the network from a checkpoint or a bare state dict (weights only)")
    return build_parser(TrainOptions, parser)


def resolve_options(argv) -> tuple[TrainOptions, argparse.Namespace, dict | None]:
    """Options, the script-only arguments, and the checkpoint when resuming."""
    namespace = get_args_parser().parse_args(argv)
    given = {key: value for key, value in vars(namespace).items() if key not in ("resume", "init_weights", "preset")}
    if namespace.resume is None:
        values = {}
        if getattr(namespace, "preset", None):
            values.update(load_preset(TrainOptions, namespace.preset))
            values.setdefault("name", Path(str(namespace.preset)).stem)
        values.update(given)
        options = options_from_dict(TrainOptions, values, source="command line")
        return options, namespace, None
    if getattr(namespace, "preset", None) or namespace.init_weights is not None:
        raise InputError("--resume continues a run with the options in its checkpoint: "
                         "--preset and --init_weights cannot be combined with it")
    namespace.resume = resume_checkpoint_path(namespace.resume)
    checkpoint = load_checkpoint(namespace.resume)
    check_finite_weights(checkpoint["model"], namespace.resume)
    refused = sorted(set(given) - RESUMABLE_OVERRIDES)
    if refused:
        raise InputError(f"--resume: {refused} cannot change in a resumed run (allowed: {sorted(RESUMABLE_OVERRIDES)})")
    values = dict(checkpoint["options"])
    values.update(given)
    options = options_from_dict(TrainOptions, values, source=f"{namespace.resume} + command line")
    return options, namespace, checkpoint


def resume_checkpoint_path(path: Path) -> Path:
    """The checkpoint ``--resume`` continues: ``path`` itself, or a run folder's ``last.pt``.

    A resumed run writes its logs, metrics and checkpoints into the checkpoint's folder, so that
    folder must be a run folder (``options.yaml`` beside the checkpoint, as ``train.py`` writes it);
    a checkpoint copied elsewhere starts a new run with ``--init_weights`` instead.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / "last.pt").is_file():
            raise InputError(f"--resume {path}: this folder holds no last.pt; pass a run folder of train.py "
                             "or its last.pt")
        path = path / "last.pt"
    elif not path.exists():
        raise FileNotFoundError(f"--resume {path}: no such checkpoint or run folder")
    if not (path.parent / "options.yaml").is_file():
        raise InputError(f"--resume {path}: not inside a run folder (no options.yaml beside it), so there is no "
                         "run to continue; to start a new run from these weights use --init_weights")
    return path


def check_finite_weights(state: dict, source) -> None:
    """Raise InputError naming the first weight that holds NaN or inf: training on from such weights
    would fail at its first step, with advice (lower the learning rate) that cannot help."""
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            raise InputError(f"{source}: weight {name!r} holds NaN or inf; the run had diverged when this "
                             "checkpoint was saved: resume from an earlier checkpoint or start again")


def prepare_folds(options: TrainOptions, scans) -> list[list[int]]:
    """Subject ids per fold: from ``folds_file``, or the baseline's seeded split of the scans' subjects."""
    if options.folds_file:
        return read_folds(options.folds_file)
    subjects = sorted({ref.subject for ref in scans})
    return subject_folds(subjects, options.num_folds, options.split_seed)


def init_output_at_identity(model: torch.nn.Module, geometry: PairGeometry) -> None:
    """Zero the output layer's weights and set its bias to "no motion" (``tf.identity_prediction``).

    With torchvision's initialisation the untrained head outputs rotations of ~0.3 rad (corners move
    by centimetres), and the first epochs of a short run are spent unlearning them. A zero-initialised
    last layer (as DiT does) starts from the identity; its weights get gradients from the first step.
    A model whose output is not its last layer's (``patch_flow``: a rigid fit of per-patch motions)
    knows its own identity start (``init_at_identity``).
    """
    if hasattr(model, "init_at_identity"):
        model.init_at_identity()
        return
    head = models.output_layer(model)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(tf.identity_prediction(geometry.pred_type, geometry.num_pairs, geometry.image_points_mm))


def make_scheduler(optimizer, options: TrainOptions, total_steps: int | None):
    warmup = options.warmup_steps

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if options.lr_schedule == "cosine" and total_steps:
            progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(model, options: TrainOptions):
    if options.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=options.learning_rate, weight_decay=options.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=options.learning_rate, weight_decay=options.weight_decay)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What a finished (or stopped) run reached; ``losses`` are this invocation's step losses."""

    run_dir: Path
    epoch: int
    step: int
    best: dict
    losses: list[float]


def main(argv=None) -> Path:
    """Train; returns the run folder."""
    return run(argv).run_dir


def run(argv=None) -> TrainResult:
    """Train with command-line style arguments (see ``get_args_parser``); DDP when torchrun launched us."""
    distributed = init_distributed()
    if distributed.enabled and not dist.is_initialized():
        # nccl for GPUs; TUSREC_DDP_BACKEND=gloo forces gloo (e.g. CPU processes on a GPU machine).
        backend = os.environ.get("TUSREC_DDP_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend=backend)
    try:
        return _run(argv, distributed)
    finally:
        remove_logging()
        if distributed.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _run(argv, distributed: Distributed) -> TrainResult:
    options, namespace, checkpoint = resolve_options(argv)
    setup_logging(None, distributed)
    device = setup_device(options, distributed)
    data = prepare_data(options, checkpoint, distributed)  # every input is checked before a run folder exists
    run_dir = open_run_dir(options, namespace, checkpoint, distributed)
    with removed_if_unused(run_dir, distributed.is_main and checkpoint is None):
        return _train(options, namespace, checkpoint, device, data, run_dir, distributed)


def _train(options: TrainOptions, namespace, checkpoint, device: torch.device, data: RunData, run_dir: Path,
           distributed: Distributed) -> TrainResult:
    setup_logging(run_dir, distributed)
    log.info("run folder: %s", run_dir)
    log.info("device: %s, processes: %d", device, distributed.world_size)
    log_data(options, data)
    if distributed.is_main and checkpoint is None:
        write_run_description(run_dir, options, data)
    if distributed.is_main and checkpoint is not None:
        # Rows of epochs after the checkpoint come from the run that died: they are trained again.
        keep_metrics_rows_until(run_dir / "metrics.csv", checkpoint["epoch"])
    # Frame loaders before the network, as ever (the order fixes what a seed gives); cached measurements
    # need the network's encoder first.
    loaders = None if options.feature_cache else make_loaders(options, data, device, distributed)
    geometry = make_geometry(options, data, device)
    label_stats = checkpoint["label_stats"] if checkpoint is not None and "label_stats" in checkpoint \
        else training_label_statistics(data, geometry, options)
    if options.label_norm or options.loss_dofs != "all":
        geometry.loss_weights = label_loss_weights(label_stats, options).to(device)
    model, model_args = build_network(options, geometry, data, label_stats, namespace.init_weights, checkpoint, device)
    if options.feature_cache:
        if checkpoint is not None:  # measured with the run's own (fixed) encoder
            load_model_state(model, checkpoint["model"], f"checkpoint {namespace.resume}")
        if distributed.enabled:
            # Every rank measures with rank 0's weights, as DistributedDataParallel would make them only
            # later: each rank draws its own initial weights (seed + rank), an untrained encoder too.
            for tensor in model.state_dict().values():
                dist.broadcast(tensor, src=0)
        loaders = make_measured_loaders(options, data, device, distributed, model)
    optimizer = make_optimizer(model, options)
    steps_per_epoch = math.ceil(len(loaders.train_sampler) / options.minibatch_size)
    total_steps = options.max_steps or (steps_per_epoch * options.num_epochs if options.num_epochs < 10**7 else None)
    scheduler = make_scheduler(optimizer, options, total_steps)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and options.amp and options.amp_dtype == "float16")
    state = restore_state(checkpoint, model, optimizer, scheduler, scaler, distributed, namespace.resume)
    train_model = model
    if distributed.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    log.info("model: %s (%s), %s parameters, %d pairs per window, pred %s, label %s%s",
             options.model_name, model_args, f"{sum(p.numel() for p in model.parameters()):,}", geometry.num_pairs,
             options.pred_type, options.label_type,
             f", loss weights per DOF {[round(w, 3) for w in geometry.loss_weights.tolist()]}"
             if geometry.loss_weights is not None else "")

    def save(name: str) -> None:
        if not distributed.is_main:
            return
        save_checkpoint(run_dir / name, {
            "format_version": 1, "model": unwrap_model(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": state["epoch"],
            "batch_in_epoch": state["batch_in_epoch"], "step": state["step"], "best": dict(state["best"]),
            "options": options_to_dict(options), "model_args": model_args, "rng": rng_state(),
            "folds": [list(map(int, fold)) for fold in data.folds], "label_stats": label_stats,
            "frame_size": [data.height, data.width],
        })

    state["save"] = save
    tb_writer = None
    if distributed.is_main:
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only where it is used

        tb_writer = SummaryWriter(str(run_dir / "tb"))

    def validate(epoch: int, row: dict) -> None:
        if loaders.val is None or epoch % options.val_fre:
            return
        row.update(evaluate(train_model, loaders.val, geometry, device, options, distributed))
        if options.val_scan_every and epoch % options.val_scan_every == 0:
            if distributed.is_main:
                measured = loaders.val.dataset.measurements if options.feature_cache else None
                row.update(evaluate_scans(model, data.val_scans, data.val_sources, data.read_factor, data.calibration,
                                          device, options, measured))
            if distributed.enabled:
                dist.barrier()
        metric = options.best_metric
        value = row.get(metric, math.nan)  # val_GPE exists only at epochs with whole-scan validation
        if distributed.is_main and math.isfinite(value) and value < state["best"].get(metric, math.inf):
            state["best"] = {metric: value, "epoch": epoch, "step": state["step"]}
            save("best.pt")

    def record(row: dict) -> None:
        if not distributed.is_main:
            return
        append_metrics_row(run_dir / "metrics.csv", row)
        for key, value in row.items():
            if key not in ("epoch", "step") and isinstance(value, float) and math.isfinite(value):
                tb_writer.add_scalar(key, value, row["epoch"])
        tb_writer.flush()
        plot_curves(run_dir)
        if row["epoch"] % options.freq_info == 0 or row["epoch"] == options.num_epochs:
            log_epoch(row)

    with StopSignals() as stop:  # Ctrl-C / SIGTERM: finish the step, save last.pt, then stop
        state["stop"] = stop
        try:
            # Epoch 0 is the untrained network: the first point of the validation curve.
            if checkpoint is None:
                row = {"epoch": 0, "step": 0, "lr": optimizer.param_groups[0]["lr"]}
                validate(0, row)
                record(row)
            while state["epoch"] < options.num_epochs and not stop_requested(stop, device, distributed):
                if options.max_steps is not None and state["step"] >= options.max_steps:
                    break
                epoch = state["epoch"]
                loaders.train_sampler.set_epoch(epoch)
                loaders.train_sampler.set_start(state["batch_in_epoch"] * options.minibatch_size)
                stats = train_one_epoch(train_model, loaders.train, optimizer, scheduler, scaler, geometry, device,
                                        options, state, distributed, description=f"epoch {epoch + 1}")
                if state["batch_in_epoch"] < steps_per_epoch:  # stopped inside the epoch (max_steps, a signal)
                    break
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
                row = {"epoch": state["epoch"], "step": state["step"], "lr": optimizer.param_groups[0]["lr"],
                       "train_loss": stats["train_loss"], "train_dist": stats["train_dist"],
                       "epoch_s": stats["epoch_s"],
                       "samples_per_s": stats["samples"] / stats["epoch_s"] if stats["epoch_s"] > 0 else math.nan,
                       "data_wait_fraction": stats["data_wait_fraction"]}
                validate(state["epoch"], row)
                record(row)
                if state["epoch"] % options.freq_save == 0:
                    save("last.pt")
            save("last.pt")
            stopped = stop_requested(stop, device, distributed)  # under DDP: by a signal to any rank
        finally:
            if tb_writer is not None:
                tb_writer.close()
            stop_loader_workers(loaders.train, loaders.val)
    if stopped:
        signum = stop.signum or signal.SIGTERM  # a rank that got none stops as if terminated
        log.info("stopped by %s at epoch %d, step %d; last.pt is saved: continue with  python train.py --resume %s",
                 signal.Signals(signum).name, state["epoch"], state["step"], run_dir / "last.pt")
        raise Interrupted(signum)
    best = state["best"]
    best_value = best.get(options.best_metric, math.inf)
    log.info("finished at epoch %d, step %d; best %s %s (epoch %s); checkpoints in %s", state["epoch"], state["step"],
             options.best_metric, f"{best_value:.3f} mm" if math.isfinite(best_value) else "n/a", best["epoch"], run_dir)
    return TrainResult(run_dir, state["epoch"], state["step"], dict(state["best"]), list(state["last_losses"]))


# --------------------------------------------------------------------------------------------
# The steps of a run
# --------------------------------------------------------------------------------------------


def setup_device(options: TrainOptions, distributed: Distributed) -> torch.device:
    device = resolve_device(options.device, distributed)
    if device.type == "cpu":
        # glibc's allocator otherwise maps and zeroes every large activation afresh at each step; the
        # setting made for CPU inference speeds training steps up as well (see bench_train.py).
        configure_cpu_inference()
    torch.manual_seed(options.seed + distributed.rank)  # dropout differs per rank, data split does not
    return device


def open_run_dir(options: TrainOptions, namespace, checkpoint, distributed: Distributed) -> Path:
    """A new numbered run folder (rank 0 creates it, the others learn its name), or the resumed one."""
    if checkpoint is not None:
        return Path(namespace.resume).resolve().parent
    run_dir = make_run_dir(options.out_dir, options.name or "train") if distributed.is_main else None
    return Path(broadcast_object(str(run_dir) if run_dir else None, distributed))


@dataclass
class RunData:
    """The scans of a run: ``*_sources`` are the original files (poses, frame size, metrics),
    ``*_scans`` what the network reads (the originals, or a down-sampled cache, then
    ``read_factor`` 1)."""

    data_root: Path
    calibration: object
    source_scans: list
    folds: list
    train_sources: list
    val_sources: list
    train_scans: list
    val_scans: list
    read_factor: int
    height: int
    width: int


def prepare_data(options: TrainOptions, checkpoint, distributed: Distributed) -> RunData:
    """Find the scans, split them into folds (or take the checkpoint's), check one frame size, and
    build the down-sampled cache when asked (rank 0 writes it, the others wait and look it up)."""
    data_root = resolve_data_root(options.data_path)
    calibration = load_calibration(options.calib_file or data_root / CALIB_FILE)
    source_scans = find_scans(data_root)
    if not source_scans:
        raise FileNotFoundError(f"no scans found under {data_root}")
    folds = checkpoint.get("folds") if checkpoint is not None and "folds" in checkpoint else prepare_folds(options, source_scans)
    train_sources = scans_of_folds(source_scans, folds, options.train_folds)
    val_sources = scans_of_folds(source_scans, folds, options.val_folds)
    if not train_sources:
        raise InputError(f"training folds {options.train_folds} hold no scans under {data_root}")
    sizes = check_scans(train_sources + val_sources, min_frames=options.num_samples)
    frame_sizes = {(height, width) for _, height, width in sizes.values()}
    if len(frame_sizes) != 1:
        raise InputError(f"scans under {data_root} have different frame sizes {sorted(frame_sizes)}; "
                         "one network input size is expected")
    height, width = frame_sizes.pop()
    if options.downsample > 1 and options.cache_dir:
        if distributed.is_main:
            train_scans = cache_downsampled_scans(train_sources, options.downsample, options.cache_dir, progress=True)
            val_scans = cache_downsampled_scans(val_sources, options.downsample, options.cache_dir, progress=True)
        if distributed.enabled:
            dist.barrier()
        if not distributed.is_main:  # the cache is complete now: these calls only look it up
            train_scans = cache_downsampled_scans(train_sources, options.downsample, options.cache_dir)
            val_scans = cache_downsampled_scans(val_sources, options.downsample, options.cache_dir)
        read_factor = 1
    else:
        train_scans, val_scans, read_factor = train_sources, val_sources, options.downsample
    return RunData(data_root, calibration, source_scans, folds, train_sources, val_sources, train_scans, val_scans,
                   read_factor, height, width)


def log_data(options: TrainOptions, data: RunData) -> None:
    log.info("data: %s, %d training scans, %d validation scans, frames %dx%d%s", data.data_root,
             len(data.train_scans), len(data.val_scans), data.height, data.width,
             f" down-sampled x{options.downsample}" if options.downsample > 1 else "")


@contextlib.contextmanager
def removed_if_unused(run_dir: Path, enabled: bool):
    """Remove a new run folder when the run fails before writing anything of value (a metrics row or
    a checkpoint), so failed starts leave no numbered folders holding only a log."""
    try:
        yield
    except BaseException:
        if enabled and not any((run_dir / name).exists() for name in ("metrics.csv", "last.pt", "best.pt")):
            remove_logging()  # log.txt is open in the folder
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def keep_metrics_rows_until(path: Path, last_epoch: int) -> None:
    """Drop the rows of ``metrics.csv`` after epoch ``last_epoch`` (rewritten atomically), so a resumed
    run appends each epoch once even when the run before it died between a row and its checkpoint."""
    if not path.is_file():
        return
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        fields, rows = reader.fieldnames, list(reader)
    kept = [row for row in rows if int(row["epoch"]) <= last_epoch]
    if len(kept) == len(rows):
        return
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept)
    log.info("metrics.csv: dropped %d row(s) after epoch %d, written by the run that stopped", len(rows) - len(kept),
             last_epoch)


def write_run_description(run_dir: Path, options: TrainOptions, data: RunData) -> None:
    """``options.yaml`` (a valid preset) and ``folds.json`` of a new run."""
    write_options(options, run_dir / "options.yaml", header=f"Resolved options of {run_dir.name}; usable as a preset.")
    scans_by_subject = {}
    for ref in data.source_scans:
        scans_by_subject.setdefault(ref.subject, []).append(ref.name)
    write_folds(run_dir / "folds.json", data.folds, data.data_root, options.split_seed, scans_by_subject)


@dataclass
class Loaders:
    train: DataLoader
    train_sampler: EpochSampler
    val: DataLoader | None


def measured_scans(model, scans, read_factor: int, device: torch.device, what: str,
                   cache_dir=None) -> MeasuredWindowDataset:
    """``--feature_cache``: each scan measured once by the network's fixed first stage (``measure_scan``),
    kept in memory on the CPU, windows sliced from it. With ``cache_dir`` (``--cache_dir``) the
    measurements are also kept on disk and a later run with the same encoder and scans reads them
    instead of measuring again (``utils.training_data.measurement_cache_path``)."""
    measurements, poses = [], []
    started = time.perf_counter()
    model_key = model.measurement_key() if cache_dir else None
    reused = 0
    for ref in scans:
        path = measurement_cache_path(cache_dir, model_key, ref, read_factor, device.type) if cache_dir else None
        if path is not None and path.is_file():
            rows = load_measurements(path)
            reused += 1
        else:
            frames = torch.from_numpy(read_scan_frames(ref, read_factor)).to(device)
            rows = as_rows(model.measure_scan(frames))
            if path is not None:
                save_measurements(path, rows)
        measurements.append(rows)
        with ScanFile(ref) as scan_file:
            poses.append(np.asarray(scan_file.read_tforms(), dtype=np.float64))
    log.info("feature cache: %d %s scans measured, %d read from %s, in %.0f s", len(scans) - reused, what, reused,
             Path(cache_dir) / MEASUREMENT_FOLDER if cache_dir else "nowhere (no --cache_dir)",
             time.perf_counter() - started)
    return MeasuredWindowDataset(measurements, poses, int(unwrap_model(model).num_frames))


def as_rows(measured):
    """``measure_scan``'s dict (a batch of one) as per-frame rows on the CPU, as ``measured_scans`` keeps it."""
    return map_tensors(lambda tensor: tensor[0].cpu(), measured)


def as_batch_of_one(rows):
    """Per-frame rows (``as_rows``) as ``measure_scan``'s dict again."""
    return map_tensors(lambda tensor: tensor[None], rows)


def make_loaders(options: TrainOptions, data: RunData, device: torch.device, distributed: Distributed) -> Loaders:
    # Mirrored in the original pixels' mm: the frames handed out are data.width // downsample wide.
    mirror = Mirror.for_frames(data.calibration, data.width // options.downsample, options.downsample)
    train_set = FrameWindowDataset(data.train_scans, options.num_samples, options.sample_range,
                                   downsample=data.read_factor, reverse_prob=options.reverse_prob,
                                   max_stride=options.max_stride, flip_prob=options.flip_prob, mirror=mirror,
                                   gain_jitter=options.gain_jitter)
    train_sampler = EpochSampler(len(train_set), options.samples_per_scan, seed=options.seed, shuffle=True,
                                 rank=distributed.rank, world_size=distributed.world_size)
    # A private generator: DataLoader draws its workers' base seed from it, not from the global RNG,
    # so the dropout RNG sequence does not depend on where an epoch's iterator was created (resume).
    # Workers ignore Ctrl-C / SIGTERM (sent to the whole process group): the main process decides
    # when to stop, after a whole step, and shuts them down.
    loader_args = dict(batch_size=options.minibatch_size, num_workers=options.num_workers,
                       pin_memory=device.type == "cuda", persistent_workers=options.num_workers > 0,
                       generator=torch.Generator(), worker_init_fn=ignore_stop_signals)
    train_loader = DataLoader(train_set, sampler=train_sampler, **loader_args)
    val_loader = None
    if data.val_scans:
        val_set = FrameWindowDataset(data.val_scans, options.num_samples, options.sample_range,
                                     downsample=data.read_factor)
        val_sampler = EpochSampler(len(val_set), options.val_samples_per_scan, seed=options.seed + 1, shuffle=False,
                                   rank=distributed.rank, world_size=distributed.world_size)
        val_sampler.set_epoch(0)  # fixed windows: every validation sees the same ones
        val_loader = DataLoader(val_set, sampler=val_sampler, **loader_args)
    else:
        log.warning("no validation scans (folds %s): validation and best.pt are skipped", options.val_folds)
    return Loaders(train_loader, train_sampler, val_loader)


def make_measured_loaders(options: TrainOptions, data: RunData, device: torch.device, distributed: Distributed,
                          model) -> Loaders:
    """``--feature_cache`` loaders: windows of the scans' cached measurements (``MeasuredWindowDataset``),
    read in the main process (the cache is in memory: workers would only copy it)."""
    model = unwrap_model(model)
    train_set = measured_scans(model, data.train_scans, data.read_factor, device, "training", options.cache_dir)
    train_sampler = EpochSampler(len(train_set), options.samples_per_scan, seed=options.seed, shuffle=True,
                                 rank=distributed.rank, world_size=distributed.world_size)
    loader_args = dict(batch_size=options.minibatch_size, num_workers=0, generator=torch.Generator())
    train_loader = DataLoader(train_set, sampler=train_sampler, **loader_args)
    val_loader = None
    if data.val_scans:
        val_set = measured_scans(model, data.val_scans, data.read_factor, device, "validation", options.cache_dir)
        val_sampler = EpochSampler(len(val_set), options.val_samples_per_scan, seed=options.seed + 1, shuffle=False,
                                   rank=distributed.rank, world_size=distributed.world_size)
        val_sampler.set_epoch(0)  # fixed windows: every validation sees the same ones
        val_loader = DataLoader(val_set, sampler=val_sampler, **loader_args)
    return Loaders(train_loader, train_sampler, val_loader)


def stop_loader_workers(*loaders) -> None:
    """Stop the worker processes of DataLoaders (persistent workers) now, while their queues work.

    A persistent iterator lives as long as its DataLoader, and the run's closures hold the loaders in
    reference cycles: they are collected late (at exit, or by the cycle collector), when their queues
    may be finalised before the iterator, so the stop message never reaches the workers and torch
    falls back to SIGTERM, which the workers ignore (``ignore_stop_signals``): ``python train.py``
    then never exited. ``_shutdown_workers`` is what the iterator's own ``__del__`` calls.
    """
    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
            loader._iterator = None


def make_geometry(options: TrainOptions, data: RunData, device: torch.device) -> PairGeometry:
    return PairGeometry(
        pairs=tf.window_pairs(options.window_pairs, options.num_samples, options.num_pred).to(device),
        pred_type=options.pred_type, label_type=options.label_type,
        calib_R_T=torch.from_numpy(np.array(data.calibration.calib_R_T)).to(device),
        image_points_mm=image_points_mm(data.calibration.scale, data.height, data.width).to(device),
        loss_kind=options.loss, accumulated_weight=options.accumulated_loss_weight,
    )


def training_label_statistics(data: RunData, geometry: PairGeometry, options: TrainOptions) -> dict:
    """Mean and spread per DOF of the ``parameter`` labels of the training fold's pairs.

    Every window of consecutive frames of every training scan, with the run's pairs
    (``pair_samples``): the labels the network sees without stride or reversal augmentation.
    Returns ``{"mean": [6], "std": [6]}`` (radians, mm; plain lists, stored in the checkpoint).
    """
    calib = geometry.calib_R_T.double().cpu()
    pairs = geometry.pairs.cpu()
    values = []
    for ref in data.train_sources:
        with ScanFile(ref) as scan_file:
            tforms = torch.from_numpy(np.asarray(scan_file.read_tforms(), dtype=np.float64))
        starts = torch.arange(len(tforms) - options.num_samples + 1)
        windows = tforms[starts[:, None] + torch.arange(options.num_samples)]  # [W, n, 4, 4]
        values.append(tf.matrix_to_params(tf.relative_transforms(windows, pairs, calib)).reshape(-1, 6))
    values = torch.cat(values)
    return {"mean": values.mean(dim=0).tolist(), "std": values.std(dim=0).tolist()}


def label_loss_weights(label_stats: dict, options: TrainOptions) -> torch.Tensor:
    """Per-value weights of a ``parameter`` label's MSE, repeated for every pair of the window.

    ``label_norm``: 1 / std^2 of each DOF over the training fold, so the loss is the mean squared
    error in units of each DOF's own spread (about 1 for a network that predicts no motion);
    ``loss_dofs='in_plane'``: the out-of-plane DOFs weigh 0 (a network that predicts no out-of-plane
    motion is not asked to).
    """
    std = torch.tensor(label_stats["std"], dtype=torch.float64)
    weights = 1.0 / std.clamp_min(1e-12) ** 2 if options.label_norm else torch.ones(6, dtype=torch.float64)
    if options.loss_dofs == "in_plane":
        keep = torch.zeros(6, dtype=torch.bool)
        keep[list(tf.IN_PLANE_DOFS)] = True
        weights = torch.where(keep, weights, torch.zeros_like(weights))
    return weights.float()


def build_network(options: TrainOptions, geometry: PairGeometry, data: RunData, label_stats: dict, init_weights,
                  checkpoint, device: torch.device):
    """The network and its ``model_args``: extra constructor arguments where the model needs them
    (``patch_flow``: the pixel size of the frames it sees, its patches and fit), its output scale from the training
    labels, then initial weights, the identity start, or (resuming) nothing here."""
    kwargs = {}
    if options.model_name in ("patch_flow", "seq_flow"):
        scale = np.array(data.calibration.scale, dtype=np.float64)
        kwargs["pixel_mm"] = [float(scale[0, 0]) * options.downsample, float(scale[1, 1]) * options.downsample]
        kwargs.update(patch_size=options.patch_size, num_patches=options.num_patches, radius=options.search_radius,
                      patch_selection=options.patch_selection, robust_iterations=options.robust_iterations)
    if options.model_name == "seq_flow":
        kwargs.update(offsets=list(options.seq_offsets), hidden=options.seq_hidden,
                      appearance_dim=options.seq_appearance_dim, freeze_encoder=options.freeze_encoder)
    model_args = models.model_args(options.model_name, options.num_samples, geometry.pred_dim(), **kwargs)
    model = models.build_from_args(model_args).to(device)
    if hasattr(model, "set_label_statistics"):
        size = (data.height // options.downsample, data.width // options.downsample)
        model.set_label_statistics(torch.tensor(label_stats["mean"]), torch.tensor(label_stats["std"]), size)
    if init_weights is not None:
        load_model_weights(model, init_weights, map_location=device)
        log.info("initial weights: %s", init_weights)
    elif options.identity_init and checkpoint is None:
        init_output_at_identity(model, geometry)
    return model, model_args


def restore_state(checkpoint, model, optimizer, scheduler, scaler, distributed: Distributed, resume_path) -> dict:
    """The loop's state: a fresh start, or everything a checkpoint saved (``--resume``)."""
    state = {"epoch": 0, "batch_in_epoch": 0, "step": 0, "best": {"epoch": None, "step": None}, "last_losses": []}
    if checkpoint is None:
        return state
    load_model_state(model, checkpoint["model"], str(resume_path))
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    if checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    state.update(epoch=checkpoint["epoch"], batch_in_epoch=checkpoint["batch_in_epoch"], step=checkpoint["step"],
                 best=dict(checkpoint["best"]))
    if distributed.world_size == 1:
        set_rng_state(checkpoint["rng"])
    # else: the checkpoint holds rank 0's generators only; every rank keeps its seed + rank stream,
    # so a resumed DDP run continues with the same data but different dropout draws.
    log.info("resumed from %s at epoch %d, batch %d, step %d", resume_path, state["epoch"],
             state["batch_in_epoch"], state["step"])
    return state


def log_epoch(row: dict) -> None:
    """The epoch's summary line, and the per-DOF line: validation error / no motion's, per DOF."""
    parts = [f"{key} {row[key]:.4g}" for key in ("train_loss", "train_dist", "val_loss", "val_dist", "val_GPE", "val_LPE")
             if isinstance(row.get(key), float) and math.isfinite(row[key])]
    log.info("[epoch %d, step %d] %s", row["epoch"], row["step"], ", ".join(parts))
    dofs = [f"{dof} {row[f'val_{dof}']:.3g}/{row[f'val_{dof}_identity']:.3g} {unit}"
            for dof, unit in zip(tf.DOF_NAMES, tf.DOF_UNITS) if math.isfinite(row.get(f"val_{dof}", math.nan))]
    if dofs:
        sign = row.get("val_oop_sign_acc", math.nan)
        log.info("  per DOF, validation error / no motion's: %s; out-of-plane sign accuracy %s", ", ".join(dofs),
                 f"{sign:.1%}" if math.isfinite(sign) else "n/a (none predicted)")
    drift = row.get("val_window_drift", math.nan)
    if isinstance(drift, float) and math.isfinite(drift):
        log.info("  window drift (corners placed from each window's first frame): %.3f mm / no motion's %.3f mm",
                 drift, row["val_window_drift_identity"])


if __name__ == "__main__":
    sys.exit(run_cli(main))

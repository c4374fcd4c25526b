"""Evaluation demo: scan poses in the challenge layout -> a drifting prediction -> official scores.

What ``make demo`` runs until the simulator and training land. It

1. writes a small synthetic dataset in the challenge's train layout: probe trajectories of the
   2025 rotation protocol (fan, rock, rotate ~90 degrees about the probe axis, fan, rock, around a
   fixed contact point, with slow drift and hand tremor) with the real calibration; the frames are
   placeholder speckle inside the probe's sector, since no image is read by the evaluation;
2. reads it back through the validating readers;
3. simulates what a trackerless method does: it predicts each local transform with a small bias
   (under-estimated motion, as regression to the mean does) and noise, and chains them;
4. scores every scan with the official metrics from transforms, and once more from the four DDFs
   streamed to disk (HDF5), which must agree to 1e-4 mm;
5. does the same on the real tracked PLUS scans in ``../shared/realdata`` when they are there
   (no landmarks: landmark metrics are reported as absent);
6. prints the per-scan and summary tables and writes CSVs, a 3D corner-trajectory plot and a drift
   curve per scan into a new ``results/<NNN>-demo/``.
"""

from __future__ import annotations

import argparse
import logging
import math
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from utils import metrics
from utils import transform as tf
from utils.Transf2DDFs import write_ddfs
from utils.calibration import default_calibration, load_calibration, write_calib_matrices
from utils.challenge_data import CALIB_FILE, find_scans, read_scan, write_landmarks, write_scan
from utils.plotting import plot_corner_trajectories, plot_drift
from utils.run_dir import make_run_dir

log = logging.getLogger("demo")

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_REALDATA = REPO_ROOT.parent / "shared" / "realdata"
FPS = 20.0  # the challenge's frame rate


# --------------------------------------------------------------------------------------------
# Synthetic poses in the challenge layout
# --------------------------------------------------------------------------------------------


def rotation_protocol_image_poses(rng: np.random.Generator, num_frames: int, height: int, width: int,
                                  pixel_mm) -> np.ndarray:
    """Image-plane poses T_{world<-image mm} [N, 4, 4] of a 2025-style rotation scan, float64.

    Image mm axes: x lateral (columns), y depth (rows), z elevational. The probe pivots about the
    skin contact point at the top centre of the image: fanning tilts about the lateral axis (x),
    rocking about the elevational axis (z), and half-way the probe turns ~90 degrees about the beam
    axis (y). Slow drift and 8-12 Hz tremor are added to all six degrees of freedom.
    """
    t = np.arange(num_frames) / FPS
    phase = t / t[-1] if num_frames > 1 else t
    fan = np.deg2rad(rng.uniform(15, 25)) * np.sin(2 * np.pi * t / rng.uniform(2.5, 4.0))
    rock = np.deg2rad(rng.uniform(8, 15)) * np.sin(2 * np.pi * t / rng.uniform(2.0, 3.5) + 1.0)
    # minimum-jerk turn about the beam axis over the middle fifth of the scan
    s = np.clip((phase - 0.4) / 0.2, 0, 1)
    turn = np.deg2rad(rng.uniform(80, 100)) * (10 * s**3 - 15 * s**4 + 6 * s**5)
    tremor_hz = rng.uniform(8, 12)
    tremor = 0.05 * np.sin(2 * np.pi * tremor_hz * t[:, None] + rng.uniform(0, 2 * np.pi, 3))
    drift = np.cumsum(rng.normal(0, 0.05, (num_frames, 3)), axis=0)  # mm, a random walk

    contact = np.array([(width + 1) / 2 * pixel_mm[0], 32 * pixel_mm[1], 0.0])
    to_contact = np.eye(4)
    to_contact[:3, 3] = -contact
    poses = np.empty((num_frames, 4, 4))
    for i in range(num_frames):
        # rotation about the contact point: fan (x), rock (z), turn (y); params are (a_Z, a_Y, a_X)
        params = torch.tensor([rock[i], turn[i], fan[i], 0.0, 0.0, 0.0], dtype=torch.float64)
        pivot = tf.params_to_matrix(params).numpy()
        pose = np.linalg.inv(to_contact) @ pivot @ to_contact
        pose[:3, 3] += drift[i] + tremor[i]
        poses[i] = pose
    return poses


def placeholder_frames(rng: np.random.Generator, num_frames: int, height: int, width: int) -> np.ndarray:
    """uint8 [N, H, W]: Rayleigh speckle inside a curvilinear sector, exactly 0 outside it."""
    y, x = np.mgrid[1:height + 1, 1:width + 1]
    apex_y = -0.15 * height
    radius = np.hypot(x - (width + 1) / 2, y - apex_y)
    angle = np.arctan2(x - (width + 1) / 2, y - apex_y)
    inside = (radius >= -apex_y + 32) & (radius <= height - 2 - apex_y) & (np.abs(angle) <= np.deg2rad(33))
    frames = np.zeros((num_frames, height, width), dtype=np.uint8)
    for i in range(num_frames):
        speckle = rng.rayleigh(40.0, size=(height, width))
        frames[i][inside] = np.clip(speckle[inside], 0, 255).astype(np.uint8)
    return frames


def write_synthetic_dataset(root: Path, rng: np.random.Generator, subjects: int, frames: int, height: int,
                            width: int, landmarks_per_scan: int) -> None:
    """A train-layout dataset: ``subjects`` x (LH_rotation, RH_rotation), real calibration."""
    calibration = default_calibration()
    write_calib_matrices(root / CALIB_FILE, calibration.scale, calibration.calib_R_T)
    calib_inv = np.linalg.inv(calibration.calib_R_T)
    for subject in range(subjects):
        scan_landmarks = {}
        for scan_name in ("LH_rotation", "RH_rotation"):
            image_poses = rotation_protocol_image_poses(rng, frames, height, width, calibration.pixel_size_mm)
            # tforms are tool -> camera: T_{world<-tool} = T_{world<-image mm} C^-1
            tforms = image_poses @ calib_inv
            write_scan(root, subject, scan_name, placeholder_frames(rng, frames, height, width), tforms)
            scan_landmarks[scan_name] = np.stack(
                [rng.integers(1, frames, landmarks_per_scan),  # never frame 0
                 rng.integers(1, width + 1, landmarks_per_scan),
                 rng.integers(1, height + 1, landmarks_per_scan)], axis=1)
        write_landmarks(root, subject, scan_landmarks)


# --------------------------------------------------------------------------------------------
# A simulated trackerless prediction and its evaluation
# --------------------------------------------------------------------------------------------


def drifting_prediction(local_true: torch.Tensor, rng: np.random.Generator, bias: float = 0.9,
                        noise_mm: float = 0.03, noise_rad: float = 0.002) -> torch.Tensor:
    """Predicted local transforms [N-1, 4, 4]: the true 6-DOF motion times ``bias`` plus noise."""
    params = tf.matrix_to_params(local_true)
    noise = torch.from_numpy(np.concatenate(
        [rng.normal(0, noise_rad, (len(params), 3)), rng.normal(0, noise_mm, (len(params), 3))], axis=1))
    return tf.params_to_matrix(params * bias + noise)


def evaluate_scan(scan, calibration, rng, out_dir: Path, dataset: str, check_ddfs: bool) -> dict:
    """Score one scan's simulated prediction; write its plots; return its table row."""
    height, width = scan.frame_size
    scale, calib_r_t, _ = calibration.as_tensors(torch.float64)
    tforms = torch.from_numpy(scan.tforms.astype(np.float64))
    global_true = tf.global_transforms(tforms, calib_r_t)
    local_true = tf.local_transforms(tforms, calib_r_t)

    started = time.perf_counter()
    local_pred = drifting_prediction(local_true, rng)
    global_pred = tf.chain_local_transforms(local_pred)
    runtime_s = time.perf_counter() - started

    args = (scale, scan.landmarks, height, width)
    errors = metrics.scan_errors_from_transforms(global_true, global_pred, local_true, local_pred, *args)
    identity = metrics.identity_errors_from_transforms(global_true, local_true, *args)
    row = metrics.scan_row(f"{scan.subject:03d}", scan.name, errors, identity, runtime_s, dataset=dataset)

    if check_ddfs:
        row["GPE_from_ddfs"] = errors_from_ddf_files(global_true, local_true, global_pred, local_pred, scan,
                                                     scale, out_dir)["GPE"]

    stem = f"{dataset}_{scan.subject:03d}_{scan.name}"
    corners_mm = scale @ tf.image_corners([height, width]).double()
    first = corners_mm[None, :3]
    corners_true = torch.cat([first, tf.transform_points(global_true, corners_mm)]).numpy()
    corners_pred = torch.cat([first, tf.transform_points(global_pred, corners_mm)]).numpy()
    plot_corner_trajectories(corners_true, corners_pred, out_dir / "plots" / f"{stem}_trajectory.png",
                             title=f"{dataset} {scan.subject:03d} {scan.name}", every=max(1, len(tforms) // 40))
    drift = metrics.field_errors_from_transforms(global_true, global_pred, scale, height, width).numpy()
    plot_drift(drift, out_dir / "plots" / f"{stem}_drift.png", title=f"{stem}: global pixel error per frame")
    return row


def errors_from_ddf_files(global_true, local_true, global_pred, local_pred, scan, scale, out_dir) -> dict:
    """The same scan scored the way a submission is: four DDFs on disk, streamed."""
    height, width = scan.frame_size
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        true_path = write_ddfs(Path(tmp) / "true.h5", global_true, local_true, scale, scan.landmarks, width, height)
        pred_path = write_ddfs(Path(tmp) / "pred.h5", global_pred, local_pred, scale, scan.landmarks, width, height)
        with h5py.File(true_path, "r") as true, h5py.File(pred_path, "r") as pred:
            names = ("GP", "GL", "LP", "LL")
            fields = [true.get(n) for n in names] + [pred.get(n) for n in names]
            return metrics.scan_errors_from_ddfs(*fields)


def evaluate_dataset(root: Path, dataset: str, rng, out_dir: Path, check_first: bool) -> list[dict]:
    calibration = load_calibration(root / CALIB_FILE)
    rows = []
    refs = find_scans(root)
    for k, ref in enumerate(tqdm(refs, desc=f"scoring {dataset}", unit="scan", disable=None)):
        rows.append(evaluate_scan(read_scan(ref), calibration, rng, out_dir, dataset, check_first and k == 0))
    return rows


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results", help="root of the run folders")
    parser.add_argument("--data", type=Path, default=None,
                        help="score this dataset root (train or val/test layout) instead of writing a synthetic one")
    parser.add_argument("--subjects", type=int, default=2, help="synthetic subjects (2 scans each)")
    parser.add_argument("--frames", type=int, default=300, help="frames per synthetic scan (20 fps)")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--landmarks", type=int, default=100, help="landmarks per synthetic scan")
    parser.add_argument("--realdata", type=Path, default=DEFAULT_REALDATA,
                        help="folder of real dataset roots to score as well (skipped if absent)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv=None) -> Path:
    args = get_args_parser().parse_args(argv)
    for name in ("subjects", "frames", "height", "width", "landmarks"):
        if getattr(args, name) < (2 if name == "frames" else 1):
            raise ValueError(f"--{name}={getattr(args, name)} is too small")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rng = np.random.default_rng(args.seed)
    out_dir = make_run_dir(args.out, "demo")
    log.info("run folder: %s", out_dir)

    if args.data is None:
        data_root = out_dir / "data"
        log.info("writing a synthetic dataset (%d subjects x 2 scans x %d frames of %dx%d) to %s",
                 args.subjects, args.frames, args.height, args.width, data_root)
        write_synthetic_dataset(data_root, rng, args.subjects, args.frames, args.height, args.width, args.landmarks)
        datasets = [("synthetic", data_root)]
    else:
        datasets = [(args.data.name, args.data)]
    if args.realdata.is_dir():
        datasets += [(p.name, p) for p in sorted(args.realdata.iterdir()) if (p / CALIB_FILE).is_file()]
    else:
        log.info("no real data at %s; scoring the synthetic set only", args.realdata)

    rows = []
    for name, root in datasets:
        rows += evaluate_dataset(root, name, rng, out_dir, check_first=True)
    table = metrics.results_table(rows)
    summary = metrics.summarise(table, by="dataset")
    metrics.write_csv(table, out_dir / "scores.csv")
    metrics.write_csv(summary, out_dir / "summary.csv", index=True)

    checked = table.dropna(subset=["GPE_from_ddfs"])
    worst = float((checked["GPE"] - checked["GPE_from_ddfs"]).abs().max())
    if not worst <= 1e-4:
        raise RuntimeError(f"GPE from transforms and from streamed DDFs differ by {worst} mm (> 1e-4)")

    with pd.option_context("display.width", 160, "display.max_columns", 20, "display.float_format", "{:.4f}".format):
        print("\nPer-scan errors (mm) and normalised scores (1 = perfect, 0 = no better than no motion):")
        print(table[["dataset", "subject", "scan", "GPE", "GLE", "LPE", "LLE", "final", "pixel"]].to_string(index=False))
        print("\nSummary over scans (mean):")
        print(summary[[f"{n}_mean" for n in ("GPE", "GLE", "LPE", "LLE", "final", "pixel")]].to_string())
    print(f"\nGPE from transforms vs from streamed DDF files: max difference {worst:.2e} mm over {len(checked)} scans")
    print(f"Tables: {out_dir / 'scores.csv'}, {out_dir / 'summary.csv'}; plots: {out_dir / 'plots'}")
    if math.isnan(float(summary["final_mean"].iloc[-1])):
        print("(final scores are absent where a dataset has no landmarks, e.g. the real PLUS scans)")
    return out_dir


if __name__ == "__main__":
    main()

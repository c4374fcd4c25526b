"""Evaluation demo: scan poses in the challenge layout -> a drifting prediction -> official scores.

What ``make demo`` runs until the simulator and training land. It

1. simulates a small dataset in the challenge's train layout (``simulate.py``'s ``demo`` preset,
   shortened: 2025 rotation scans of digital forearms, real calibration, landmarks on anatomy);
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
from simulation.dataset import generate_dataset
from utils.calibration import load_calibration
from utils.challenge_data import CALIB_FILE, find_scans, read_scan
from utils.plotting import plot_corner_trajectories, plot_drift
from utils.run_dir import make_run_dir

log = logging.getLogger("demo")

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_REALDATA = REPO_ROOT.parent / "shared" / "realdata"


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
    parser.add_argument("--subjects", type=int, default=2, help="simulated subjects (2 scans each)")
    parser.add_argument("--frames", type=int, default=200, help="frames per simulated scan (20 fps)")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--landmarks", type=int, default=20, help="landmarks per simulated scan")
    parser.add_argument("--workers", type=int, default=2, help="simulator render processes")
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
        log.info("simulating %d subjects x 2 scans x %d frames of %dx%d into %s",
                 args.subjects, args.frames, args.height, args.width, data_root)
        generate_dataset(data_root, "demo", seed=args.seed, workers=args.workers, progress=True,
                         subjects=args.subjects, frames=args.frames, height=args.height, width=args.width,
                         landmarks=args.landmarks)
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

"""Training throughput and how much of a step waits for data (DESIGN.md section 6: training with the
default model must not wait on data; target: data wait under 10 % of step time).

Two measurements on a simulated dataset (2 subjects x 2 rotation scans, written once into a temporary
folder):

- ``train``: the real training loop (``train.run``) for a few epochs of efficientnet_b1 with
  ``--workers`` DataLoader workers, at full resolution (480x640) and at the fast preset's input
  (down-sampled x4: 120x160, with and without the on-disk cache). Reported per epoch after the first
  (the first pays for starting the workers): samples/s and the fraction of the epoch's wall time the
  loop spent blocked in ``next(loader)``; medians over epochs.
- ``loader``: the data pipeline alone, windows/s with ``--workers`` workers, ours (each HDF5 file
  opened once per worker) against the official baseline's ``Dataset`` pattern (the file opened for
  every item and never closed), same windows, same process; the ratio is printed.

Usage (one heavy benchmark at a time on a shared machine)::

    flock /tmp/bench.lock .venv/bin/python benchmarks/bench_train.py
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import h5py  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

import train  # noqa: E402
from simulation.dataset import generate_dataset  # noqa: E402
from utils.challenge_data import find_scans  # noqa: E402
from utils.training_data import EpochSampler, FrameWindowDataset  # noqa: E402


class PerItemOpenDataset(Dataset):
    """The official baseline's access pattern: every item opens the scan's HDF5 file (never closed)
    and reads the window's frames and poses. Same windows as ours for the same keys."""

    def __init__(self, ours: FrameWindowDataset, scans):
        self.ours, self.scans = ours, scans

    def __len__(self):
        return len(self.scans)

    def __getitem__(self, key):
        scan_index, draw_seed = key
        indices = self.ours.window_indices(scan_index, draw_seed)
        handle = h5py.File(self.scans[scan_index].frames_path, "r")  # as the baseline: opened per item
        index = sorted(int(i) for i in indices)
        return torch.from_numpy(handle["frames"][index]), torch.from_numpy(handle["tforms"][index]), scan_index


def loader_rate(dataset, sampler, workers: int, batch_size: int, batches: int) -> float:
    loader = DataLoader(dataset, sampler=sampler, batch_size=batch_size, num_workers=workers,
                        persistent_workers=False)
    iterator = iter(loader)
    next(iterator)  # workers started
    start = time.perf_counter()
    count = 0
    for _ in range(batches):
        try:
            frames, _, _ = next(iterator)
        except StopIteration:
            break
        count += frames.shape[0]
    return count / (time.perf_counter() - start)


def train_figures(data: Path, out: Path, label: str, extra: list[str], epochs: int, workers: int) -> dict:
    args = ["--DATA_PATH", str(data), "--out_dir", str(out), "--device", "cpu", "--num_workers", str(workers),
            "--num_folds", "2", "--train_folds", "0", "--val_folds", "1", "--test_folds", "",
            "--NUM_EPOCHS", str(epochs), "--val_scan_every", "0", "--val_fre", str(epochs + 1),
            "--log_every_steps", "1000", "--name", label, *extra]
    result = train.run(args)
    with open(result.run_dir / "metrics.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["train_loss"]]
    later = rows[1:] or rows
    return {
        "case": label,
        "samples_per_s": statistics.median(float(r["samples_per_s"]) for r in later),
        "data_wait_fraction": statistics.median(float(r["data_wait_fraction"]) for r in later),
        "epoch_s": statistics.median(float(r["epoch_s"]) for r in later),
        "epochs_measured": len(later),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=120, help="frames per simulated scan")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--full-batch", type=int, default=8, help="batch at 480x640 (CPU memory/time)")
    parser.add_argument("--full-samples", type=int, default=8, help="windows per scan per epoch at 480x640")
    parser.add_argument("--out", type=Path, default=Path("results/bench"))
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        print(f"simulating 2 subjects x 2 scans x {args.frames} frames of 480x640 ...", flush=True)
        generate_dataset(data, "demo", seed=0, subjects=2, frames=args.frames, workers=2)
        rows = []
        cases = [
            ("480x640", ["--MINIBATCH_SIZE", str(args.full_batch), "--samples_per_scan", str(args.full_samples)]),
            ("120x160 (x4)", ["--downsample", "4", "--MINIBATCH_SIZE", "32", "--samples_per_scan", "128"]),
            ("120x160 (x4, cache)", ["--downsample", "4", "--MINIBATCH_SIZE", "32", "--samples_per_scan", "128",
                                     "--cache_dir", str(tmp / "cache")]),
        ]
        for label, extra in cases:
            print(f"training: {label} ...", flush=True)
            rows.append(train_figures(data, tmp / "runs", label.split(" ")[0].replace("x", "by"), extra,
                                      args.epochs, args.workers) | {"case": label})

        scans = find_scans(data)
        ours = FrameWindowDataset(scans, 2, 2)
        baseline = PerItemOpenDataset(ours, scans)
        sampler = EpochSampler(len(scans), samples_per_scan=256, seed=0)
        rate_ours = loader_rate(ours, sampler, args.workers, 16, 40)
        rate_baseline = loader_rate(baseline, sampler, args.workers, 16, 40)

    print()
    print(f"{'case':<22}{'samples/s':>12}{'data wait':>12}{'epoch s':>10}")
    for row in rows:
        print(f"{row['case']:<22}{row['samples_per_s']:>12.1f}{100 * row['data_wait_fraction']:>11.1f}%"
              f"{row['epoch_s']:>10.1f}")
    print()
    print(f"loader alone (480x640 windows of 2 frames, {args.workers} workers): ours {rate_ours:.0f} windows/s, "
          f"per-item open (baseline) {rate_baseline:.0f} windows/s, ratio {rate_ours / rate_baseline:.2f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "bench_train.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"written: {args.out / 'bench_train.csv'}")


if __name__ == "__main__":
    main()

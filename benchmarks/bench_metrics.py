"""Benchmark: scan errors from transforms (utils.metrics) against materialising the DDFs officially.

For a synthetic 480x640 scan of N frames and a drifting prediction, both methods compute GPE, GLE,
LPE and LLE from the same transforms:

- ``ours``: ``utils.metrics.scan_errors_from_transforms`` (frame chunks, no DDF array);
- ``materialise``: the official flow: for the prediction and the ground truth,
  ``cal_global_ddfs`` / ``cal_local_ddfs`` as ``benchmarks.common.official_cal_ddfs`` (float32
  torch, a batched ``T @ (S @ p)`` minus ``S @ p``, to numpy, landmarks picked from the field),
  then ``cal_dist``.

Each (method, N) runs in its own subprocess (this script re-invoked with ``--worker``) so its peak
resident memory is its own. Times are the median over ``--repeats`` runs inside that process,
after an untimed warm-up on a 3-frame scan; ``extra_rss_mb`` is the peak minus the resident size
once the inputs exist (the interpreter, torch and the transforms are common to both).
Materialising 800 frames peaks near 12 GB (two 2.95 GB fields at a time, see
``run_materialise``): run full sizes one at a time, e.g. ``flock /tmp/bench.lock .venv/bin/python benchmarks/bench_metrics.py``.

    .venv/bin/python benchmarks/bench_metrics.py --frames 50 --repeats 2   # quick check
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

# Run as a script, so the repository root is not on the path; benchmarks.common and utils need it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (make_scan, official_cal_ddfs, peak_rss_bytes, repo_path, rss_bytes,  # noqa: E402
                               run_worker, time_calls)

METHODS = ("ours", "materialise")
# The first tool pose (radians ZYX, then mm), away from the identity so the transforms have no special structure.
START_POSE = (0.3, -0.2, 0.1, 10.0, -20.0, 150.0)
# Per-frame step of the random walk that the prediction's error accumulates (radians, mm).
DRIFT_STEP = (0.005, 0.3)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[400, 800], help="scan lengths N to time")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per (method, N); the median is reported")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--landmarks", type=int, default=100, help="landmarks per scan (K = 100 in 2025)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch intra-op threads in every worker (default: torch's choice); 1 gives stable timings on a shared machine",
    )
    parser.add_argument("--csv", type=Path, default=Path("results/bench/bench_metrics.csv"))
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)  # internal: one measurement
    parser.add_argument("--worker-frames", type=int, help=argparse.SUPPRESS)
    return parser


# --------------------------------------------------------------------------------------------
# Inputs (deterministic for a seed, so every worker sees the same scan)
# --------------------------------------------------------------------------------------------


def make_inputs(num_frames: int, height: int, width: int, num_landmarks: int, seed: int) -> dict:
    """``benchmarks.common.make_scan`` with a drifting prediction; landmarks as numpy, as the official data."""
    inputs = make_scan(num_frames, height, width, num_landmarks, seed, start=START_POSE, drift=DRIFT_STEP)
    inputs["landmark"] = inputs["landmark"].numpy()
    return inputs


# --------------------------------------------------------------------------------------------
# The two methods
# --------------------------------------------------------------------------------------------


def run_materialise(inputs: dict, height: int, width: int) -> dict:
    """The official flow: materialise true and predicted fields, then ``cal_dist``.

    The official ``generate_DDF`` holds all eight arrays at once (four [N-1, 3, HW] fields, ~11.8 GB
    for 800 frames, plus ~5.9 GB of ``cal_dist`` temporaries); here the global pair is compared and
    freed before the local pair is built, so 800 frames fit beside other work on a 24 GB machine.
    The time is the same computation; the peak memory is a lower bound for the official one.
    """
    from utils.metrics import cal_dist
    from utils.transform import reference_image_points

    image_points = reference_image_points([height, width], [height, width])
    scale, landmark = inputs["scale"], inputs["landmark"]
    errors = {}
    for kind in ("global", "local"):
        field_pred, landmark_pred = official_cal_ddfs(inputs[f"{kind}_pred"], scale, image_points, landmark, width, height)
        field_true, landmark_true = official_cal_ddfs(inputs[f"{kind}_true"], scale, image_points, landmark, width, height)
        prefix = kind[0].upper()
        errors[f"{prefix}PE"] = cal_dist(field_true, field_pred, "all")
        errors[f"{prefix}LE"] = cal_dist(landmark_true, landmark_pred, "landmark")
        del field_pred, field_true  # before the next pair is built
    return {name: errors[name] for name in ("GPE", "GLE", "LPE", "LLE")}


def run_ours(inputs: dict, height: int, width: int) -> dict:
    from utils.metrics import scan_errors_from_transforms

    return scan_errors_from_transforms(
        inputs["global_true"], inputs["global_pred"], inputs["local_true"], inputs["local_pred"],
        inputs["scale"], inputs["landmark"], height, width,
    )


def materialise_bytes(num_frames: int, height: int, width: int) -> int:
    """Peak bytes of ``run_materialise``: two [N-1, 3, HW] float32 fields plus two cal_dist temporaries
    (building the second field also holds a [N-1, 4, HW] product: 1 + 4/3 + 1 < 4 fields)."""
    field = (num_frames - 1) * 3 * height * width * 4
    return 4 * field


# --------------------------------------------------------------------------------------------
# Worker and driver
# --------------------------------------------------------------------------------------------


def worker(args) -> None:
    """One measurement in this process: prints one JSON line (times, peak RSS, errors)."""
    import psutil
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    frames = args.worker_frames
    if args.worker == "materialise":
        needed = materialise_bytes(frames, args.height, args.width)
        available = psutil.virtual_memory().available
        if needed * 1.15 > available:
            print(json.dumps({"skipped": f"needs ~{needed / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available"}))
            return
    inputs = make_inputs(frames, args.height, args.width, args.landmarks, args.seed)
    method = run_ours if args.worker == "ours" else run_materialise
    # Untimed warm-up on a 3-frame scan: first-call costs (thread pools, allocator) are not the method's.
    method(make_inputs(3, args.height, args.width, args.landmarks, args.seed + 1), args.height, args.width)
    baseline_rss = rss_bytes()
    times, errors = time_calls(lambda: method(inputs, args.height, args.width), args.repeats)
    print(json.dumps({"times": times, "peak_rss": peak_rss_bytes(), "baseline_rss": baseline_rss, "errors": errors,
                      "threads": torch.get_num_threads()}))


def measure(args, method: str, frames: int) -> dict:
    """One (method, N) in a fresh subprocess: the JSON ``worker`` prints."""
    worker_args = [
        "--worker", method, "--worker-frames", frames, "--repeats", args.repeats, "--height", args.height,
        "--width", args.width, "--landmarks", args.landmarks, "--seed", args.seed,
    ] + ([] if args.threads is None else ["--threads", args.threads])
    return run_worker(__file__, worker_args, f"{method} N={frames}")


def main(argv=None) -> None:
    args = get_args_parser().parse_args(argv)
    if args.worker:
        worker(args)
        return
    if min(args.frames) < 2 or args.repeats < 1:
        raise SystemExit(f"--frames must be >= 2 and --repeats >= 1, got {args.frames} and {args.repeats}")
    import pandas as pd

    from utils.metrics import ERROR_NAMES, write_csv

    rows = []
    for frames in args.frames:
        results = {}
        for method in args.methods:
            print(f"N={frames} {args.height}x{args.width} {method} ...", file=sys.stderr, flush=True)
            results[method] = measure(args, method, frames)
        for method, result in results.items():
            row = {"frames": frames, "height": args.height, "width": args.width, "method": method, "repeats": args.repeats,
                   "threads": result.get("threads")}
            if "skipped" in result:
                row["note"] = "skipped: " + result["skipped"]
                rows.append(row)
                continue
            row["median_s"] = statistics.median(result["times"])
            row["min_s"] = min(result["times"])
            row["peak_rss_mb"] = result["peak_rss"] / 2**20
            row["extra_rss_mb"] = (result["peak_rss"] - result["baseline_rss"]) / 2**20
            row.update({name: result["errors"][name] for name in ERROR_NAMES})
            rows.append(row)
        ours = next((r for r in rows if r["frames"] == frames and r["method"] == "ours" and "median_s" in r), None)
        for row in rows:
            if row["frames"] == frames and ours is not None and "median_s" in row:
                row["time_ratio_vs_ours"] = row["median_s"] / ours["median_s"]
                row["extra_rss_ratio_vs_ours"] = row["extra_rss_mb"] / max(ours["extra_rss_mb"], 1.0)
                row["max_abs_diff_mm_vs_ours"] = max(abs(row[name] - ours[name]) for name in ERROR_NAMES)
    table = pd.DataFrame(rows)
    columns = [
        "frames", "height", "width", "method", "threads", "repeats", "median_s", "min_s", "time_ratio_vs_ours", "peak_rss_mb",
        "extra_rss_mb", "extra_rss_ratio_vs_ours", *ERROR_NAMES, "max_abs_diff_mm_vs_ours", "note",
    ]
    table = table[[name for name in columns if name in table.columns]]
    shown = ["frames", "method", "threads", "median_s", "time_ratio_vs_ours", "peak_rss_mb", "extra_rss_mb", "extra_rss_ratio_vs_ours",
             "max_abs_diff_mm_vs_ours"] + (["note"] if "note" in table.columns else [])
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.float_format", "{:.4g}".format):
        print(table[[name for name in shown if name in table.columns]].to_string(index=False))
    path = write_csv(table, repo_path(args.csv))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

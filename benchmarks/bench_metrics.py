"""Benchmark: scan errors from transforms (utils.metrics) against materialising the DDFs officially.

For a synthetic 480x640 scan of N frames and a drifting prediction, both methods compute GPE, GLE,
LPE and LLE from the same transforms:

- ``ours``: ``utils.metrics.scan_errors_from_transforms`` (frame chunks, no DDF array);
- ``materialise``: the official flow, re-implemented here line for line: for the prediction and the
  ground truth, ``cal_global_ddfs`` / ``cal_local_ddfs`` as float32 torch (a batched
  ``T @ (S @ p)`` minus ``S @ p``, to numpy, landmarks picked one by one), then ``cal_dist``.

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
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
METHODS = ("ours", "materialise")
# Public TUS-REC calibration (DESIGN.md section 3).
SCALE = (0.229389190673828, 0.220979690551758, 1.0, 1.0)
CALIB_R_T = (
    (0.231064671309448, -0.218052035, 0.948189025293473, -70.74132919),
    (-0.190847036, -0.965787273, -0.175591436, -80.6505661),
    (0.954036962825936, -0.140386088, -0.264773903, -46.17662239),
    (0.0, 0.0, 0.0, 1.0),
)


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
    """Float32 global/local transforms [N-1, 4, 4] of a random-walk scan and a drifting prediction."""
    import torch

    from utils.transform import chain_local_transforms, global_transforms, local_transforms, params_to_matrix

    generator = torch.Generator().manual_seed(seed)

    def walk(step_rad, step_mm, start):
        steps = torch.cat(
            [torch.randn(num_frames, 3, generator=generator, dtype=torch.float64) * step_rad,
             torch.randn(num_frames, 3, generator=generator, dtype=torch.float64) * step_mm], dim=1
        )
        steps[0] = start
        return chain_local_transforms(params_to_matrix(steps))

    start = torch.tensor([0.3, -0.2, 0.1, 10.0, -20.0, 150.0], dtype=torch.float64)
    tforms = walk(0.02, 0.8, start)  # tool -> camera poses, as recorded
    drift = walk(0.005, 0.3, torch.zeros(6, dtype=torch.float64))  # the prediction's accumulated error
    tforms_pred = tforms @ drift
    calib = torch.tensor(CALIB_R_T, dtype=torch.float64)
    # Stored poses are float32 (DESIGN.md section 3); the official code works in float32 throughout.
    out = {
        "global_true": global_transforms(tforms, calib).float(),
        "local_true": local_transforms(tforms, calib).float(),
        "global_pred": global_transforms(tforms_pred, calib).float(),
        "local_pred": local_transforms(tforms_pred, calib).float(),
        "scale": torch.diag(torch.tensor(SCALE, dtype=torch.float32)),
    }
    out["landmark"] = torch.stack(
        [
            torch.randint(1, num_frames, (num_landmarks,), generator=generator),
            torch.randint(1, width + 1, (num_landmarks,), generator=generator),
            torch.randint(1, height + 1, (num_landmarks,), generator=generator),
        ],
        dim=1,
    ).numpy()
    return out


# --------------------------------------------------------------------------------------------
# The two methods
# --------------------------------------------------------------------------------------------


def official_ddfs(transformation, tform_calib_scale, image_points, landmark, w, h):
    """The official ``cal_global_ddfs`` / ``cal_local_ddfs`` body (they are identical but for names)."""
    import torch

    allpts = torch.matmul(transformation, torch.matmul(tform_calib_scale, image_points))
    allpts_ddf = allpts[:, 0:3, :] - torch.matmul(tform_calib_scale, image_points)[0:3, :].expand(allpts.shape[0], -1, -1)
    allpts_ddf = allpts_ddf.cpu().numpy()
    landmark_ddf = torch.zeros(3, len(landmark))
    for i in range(len(landmark)):
        # (frame, x, y): pixel (y-1)*W + (x-1) of row frame-1 (DESIGN.md section 2).
        index = (landmark[i][2] - 1) * w + landmark[i][1] - 1
        landmark_ddf[:, i] = allpts[landmark[i][0] - 1, 0:3, index] - torch.matmul(tform_calib_scale, image_points)[0:3, index]
    return allpts_ddf, landmark_ddf.cpu().numpy()


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
        field_pred, landmark_pred = official_ddfs(inputs[f"{kind}_pred"], scale, image_points, landmark, width, height)
        field_true, landmark_true = official_ddfs(inputs[f"{kind}_true"], scale, image_points, landmark, width, height)
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

    sys.path.insert(0, str(REPO_ROOT))
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
    baseline_rss = psutil.Process().memory_info().rss
    times, errors = [], None
    for _ in range(args.repeats):
        start = time.perf_counter()
        errors = method(inputs, args.height, args.width)
        times.append(time.perf_counter() - start)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps({"times": times, "peak_rss": peak_rss, "baseline_rss": baseline_rss, "errors": errors,
                      "threads": torch.get_num_threads()}))


def measure(args, method: str, frames: int) -> dict:
    command = [
        sys.executable, str(Path(__file__).resolve()), "--worker", method, "--worker-frames", str(frames),
        "--repeats", str(args.repeats), "--height", str(args.height), "--width", str(args.width),
        "--landmarks", str(args.landmarks), "--seed", str(args.seed),
    ] + ([] if args.threads is None else ["--threads", str(args.threads)])
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"worker {method} N={frames} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    args = get_args_parser().parse_args(argv)
    if args.worker:
        worker(args)
        return
    if min(args.frames) < 2 or args.repeats < 1:
        raise SystemExit(f"--frames must be >= 2 and --repeats >= 1, got {args.frames} and {args.repeats}")
    sys.path.insert(0, str(REPO_ROOT))
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
    path = write_csv(table, args.csv if args.csv.is_absolute() else REPO_ROOT / args.csv)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

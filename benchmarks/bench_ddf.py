"""Speed and peak memory of the DDF functions against the official formulation (DESIGN.md section 6).

Compares, on the same random rigid scans in one run:

- ``official``: ``benchmarks.common.official_cal_ddfs``, the challenge's ``cal_global_ddfs`` as is
  (batched ``T @ (S @ points)`` in float32 torch, subtract, ``.numpy()``);
- ``ours``: ``utils.Transf2DDFs.cal_global_ddfs``;
- ``stream-h5`` / ``stream-npy``: ``utils.Transf2DDFs.write_ddfs`` writing GP, GL, LP, LL to a
  temporary directory.

Each (implementation, N) runs in its own subprocess (this script re-invoked with ``--worker``), so
its peak resident memory (``ru_maxrss``) is its own. Reported: the median (and every) time over
repeats, throughput in frames per second (N-1 fields per call; for the streaming rows N-1 frames of
both the global and the local field, written to disk, so bounded by the disk and page cache), the
speed ratio of ``ours`` against ``official`` at the same N, the peak RSS, the
peak above the worker's RSS just before the first call, and that excess relative to the bytes of
one call's outputs (GP [N-1, 3, H*W] plus GL [3, K], float32); for ``ours``, the largest difference
from the official formulation on three frames and their landmarks (float32 rounding, ~1e-5 mm).

Full size (one heavy benchmark at a time on a shared machine):
    flock /tmp/bench.lock .venv/bin/python benchmarks/bench_ddf.py --frames 400 800 --height 480 --width 640 --repeats 3
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

# Run as a script, so the repository root is not on the path; benchmarks.common and utils need it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (make_scan, official_cal_ddfs, peak_rss_bytes, repo_path, rss_bytes,  # noqa: E402
                               run_worker, time_calls)

IMPLEMENTATIONS = ("official", "ours", "stream-h5", "stream-npy")


def worker(args):
    """Time one implementation at one N in this process and print a JSON line with time and RSS."""
    import torch

    from utils.transform import reference_image_points
    from utils.Transf2DDFs import write_ddfs
    from utils.Transf2DDFs import cal_global_ddfs as ours_cal_global_ddfs

    num_frames = args.n
    scan = make_scan(num_frames, args.height, args.width, args.landmarks, args.seed)
    transform_g, transform_l, scale, landmark = (scan["global_true"], scan["local_true"], scan["scale"],
                                                 scan["landmark"])
    points = reference_image_points([args.height, args.width], [args.height, args.width])
    if args.worker == "official":
        def call():
            return official_cal_ddfs(transform_g, scale, points, landmark, args.width, args.height)
    elif args.worker == "ours":
        def call():
            return ours_cal_global_ddfs(transform_g, scale, points, landmark, args.width, args.height)
    else:
        fmt = args.worker.split("-")[1]
        tmp_dir = Path(tempfile.mkdtemp(prefix="bench_ddf_", dir=args.tmpdir))

        def call():
            path = write_ddfs(tmp_dir / f"ddf.{fmt}", transform_g, transform_l, scale, landmark.numpy(),
                              args.width, args.height, fmt=fmt)
            if fmt == "h5":
                path.unlink()
            else:
                shutil.rmtree(path)

    # Warm up kernels and lazy imports on a tiny scan, so the measured peak is the call's own.
    tiny = make_scan(3, 4, 5, 2, 0)
    tiny_points = reference_image_points([4, 5], [4, 5])
    official_cal_ddfs(tiny["global_true"], tiny["scale"], tiny_points, tiny["landmark"], 5, 4)
    ours_cal_global_ddfs(tiny["global_true"], tiny["scale"], tiny_points, tiny["landmark"], 5, 4)
    rss_before = rss_bytes()
    try:
        times, result = time_calls(call, args.repeats)  # the last result is checked below, after the peak is read
    finally:
        if args.worker.startswith("stream"):
            shutil.rmtree(tmp_dir, ignore_errors=True)
    peak_rss = peak_rss_bytes()
    max_diff = ""
    if args.worker == "ours":
        # Same numbers as the official formulation: first, middle and last frames, and the landmarks.
        frames = torch.tensor(sorted({0, (num_frames - 1) // 2, num_frames - 2}))
        keep = torch.isin(landmark[:, 0] - 1, frames)
        renumbered = landmark[keep].clone()
        renumbered[:, 0] = torch.searchsorted(frames, renumbered[:, 0] - 1) + 1
        expected = official_cal_ddfs(transform_g[frames], scale, points, renumbered, args.width, args.height)
        max_diff = max(float(abs(result[0][frames.numpy()] - expected[0]).max()),
                       float(abs(result[1][:, keep.numpy()] - expected[1]).max()) if keep.any() else 0.0)
    print(json.dumps({"times": times, "rss_before": rss_before, "peak_rss": peak_rss,
                      "threads": torch.get_num_threads(), "max_abs_diff_mm": max_diff}))


def measure(args, implementation, num_frames):
    """One (implementation, N) in a fresh subprocess: the JSON ``worker`` prints."""
    worker_args = ["--worker", implementation, "--n", num_frames, "--height", args.height, "--width", args.width,
                   "--repeats", args.repeats, "--landmarks", args.landmarks, "--seed", args.seed]
    if args.tmpdir:
        worker_args += ["--tmpdir", args.tmpdir]
    return run_worker(__file__, worker_args, f"{implementation} N={num_frames}")


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[400, 800], help="scan lengths N")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--landmarks", type=int, default=100, help="K, landmarks per scan (100 in 2025)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    parser.add_argument("--tmpdir", default=None, help="where the streaming rows write (default: system temp)")
    parser.add_argument("--csv", default="results/bench/bench_ddf.csv", help="table as CSV (relative to the repo)")
    parser.add_argument("--worker", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.worker:
        worker(args)
        return
    rows = []
    for num_frames in args.frames:
        output_bytes = (num_frames - 1) * 3 * args.height * args.width * 4 + 3 * args.landmarks * 4
        official_time = None
        for implementation in args.implementations:
            result = measure(args, implementation, num_frames)
            median = statistics.median(result["times"])
            if implementation == "official":
                official_time = median
            excess = result["peak_rss"] - result["rss_before"]
            rows.append({
                "impl": implementation,
                "N": num_frames,
                "HxW": f"{args.height}x{args.width}",
                "median_s": round(median, 4),
                "times_s": ";".join(f"{t:.3f}" for t in result["times"]),
                "frames_per_s": round((num_frames - 1) / median, 1),
                # Only the in-memory call does the official's work; the streaming rows write two fields to disk.
                "speedup_vs_official": round(official_time / median, 2)
                if official_time and not implementation.startswith("stream") else "",
                "peak_rss_MB": round(result["peak_rss"] / 2**20, 1),
                "peak_minus_start_MB": round(excess / 2**20, 1),
                "output_MB": round(output_bytes / 2**20, 1),
                "excess_over_output": round(excess / output_bytes, 3),
                "max_abs_diff_vs_official_mm": (f"{result['max_abs_diff_mm']:.1e}"
                                                if result["max_abs_diff_mm"] != "" else ""),
                "threads": result["threads"],
            })
            print(" ".join(f"{key}={value}" for key, value in rows[-1].items()), flush=True)

    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    print()
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row[c]).rjust(widths[c]) for c in columns))
    print("frames_per_s: N-1 frames per call (streaming: N-1 frames of both global and local fields); "
          "excess_over_output: (peak RSS - RSS before the first call) / bytes of GP + GL")

    from utils.atomic import atomic_path

    csv_path = repo_path(args.csv)
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {csv_path}")


if __name__ == "__main__":
    main()

"""Speed and peak memory of the DDF functions against the official formulation (DESIGN.md section 6).

Compares, on the same random rigid scans in one run:

- ``official``: a faithful re-implementation of the challenge's ``cal_global_ddfs`` (batched
  ``T @ (S @ points)`` in float32 torch, subtract, ``.numpy()``);
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
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
IMPLEMENTATIONS = ("official", "ours", "stream-h5", "stream-npy")

# The public TUS-REC calibration's pixel -> mm scaling and calibration (DESIGN.md section 3).
REAL_SCALE = (0.229389190673828, 0.220979690551758, 1.0, 1.0)
REAL_CALIB_R_T = (
    (0.231064671309448, -0.218052035, 0.948189025293473, -70.74132919),
    (-0.190847036, -0.965787273, -0.175591436, -80.6505661),
    (0.954036962825936, -0.140386088, -0.264773903, -46.17662239),
    (0.0, 0.0, 0.0, 1.0),
)


def official_cal_global_ddfs(transformation_global, tform_calib_scale, image_points, landmark, w=640, h=480):
    """The challenge's formulation, kept as is: [N-1, 4, H*W] intermediate, then a subtracted copy."""
    import torch

    global_allpts = torch.matmul(transformation_global, torch.matmul(tform_calib_scale, image_points))
    global_allpts_ddf = global_allpts[:, 0:3, :] - torch.matmul(tform_calib_scale, image_points)[0:3, :]
    global_landmark_ddf = global_allpts_ddf.reshape(global_allpts_ddf.shape[0], 3, h, w)[
        landmark[:, 0] - 1, :, landmark[:, 2] - 1, landmark[:, 1] - 1
    ].T
    return global_allpts_ddf.cpu().numpy(), global_landmark_ddf.cpu().numpy()


def make_scan(num_frames, height, width, num_landmarks, seed):
    """Random rigid scan: global and local float32 transforms [N-1, 4, 4], S, full grid, landmarks."""
    import torch

    from utils.transform import (chain_local_transforms, global_transforms, local_transforms,
                                 params_to_matrix, reference_image_points)

    generator = torch.Generator().manual_seed(seed)
    # A random walk of tracker poses: ~1 degree and ~0.8 mm per frame, like a hand-held sweep.
    steps = torch.cat([0.02 * torch.randn(num_frames, 3, generator=generator, dtype=torch.float64),
                       0.8 * torch.randn(num_frames, 3, generator=generator, dtype=torch.float64)], dim=1)
    tforms = chain_local_transforms(params_to_matrix(steps))
    calib = torch.tensor(REAL_CALIB_R_T, dtype=torch.float64)
    scale = torch.diag(torch.tensor(REAL_SCALE, dtype=torch.float32))
    landmark = torch.stack([
        torch.randint(1, num_frames, (num_landmarks,), generator=generator),
        torch.randint(1, width + 1, (num_landmarks,), generator=generator),
        torch.randint(1, height + 1, (num_landmarks,), generator=generator),
    ], dim=1)
    return (global_transforms(tforms, calib).float(), local_transforms(tforms, calib).float(), scale,
            reference_image_points([height, width], [height, width]), landmark)


def worker(args):
    """Time one implementation at one N in this process and print a JSON line with time and RSS."""
    sys.path.insert(0, str(REPO_ROOT))
    import psutil
    import torch

    from utils.Transf2DDFs import write_ddfs
    from utils.Transf2DDFs import cal_global_ddfs as ours_cal_global_ddfs

    num_frames = args.n
    transform_g, transform_l, scale, points, landmark = make_scan(num_frames, args.height, args.width,
                                                                  args.landmarks, args.seed)
    if args.worker == "official":
        def call():
            return official_cal_global_ddfs(transform_g, scale, points, landmark, args.width, args.height)
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
    official_cal_global_ddfs(tiny[0], tiny[2], tiny[3], tiny[4], 5, 4)
    ours_cal_global_ddfs(tiny[0], tiny[2], tiny[3], tiny[4], 5, 4)
    rss_before = psutil.Process().memory_info().rss
    times = []
    try:
        for repeat in range(args.repeats):
            start = time.perf_counter()
            result = call()
            times.append(time.perf_counter() - start)
            if repeat < args.repeats - 1:
                del result  # the last one is checked below, after the peak is read
    finally:
        if args.worker.startswith("stream"):
            shutil.rmtree(tmp_dir, ignore_errors=True)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    max_diff = ""
    if args.worker == "ours":
        # Same numbers as the official formulation: first, middle and last frames, and the landmarks.
        frames = torch.tensor(sorted({0, (num_frames - 1) // 2, num_frames - 2}))
        keep = torch.isin(landmark[:, 0] - 1, frames)
        renumbered = landmark[keep].clone()
        renumbered[:, 0] = torch.searchsorted(frames, renumbered[:, 0] - 1) + 1
        expected = official_cal_global_ddfs(transform_g[frames], scale, points, renumbered, args.width, args.height)
        max_diff = max(float(abs(result[0][frames.numpy()] - expected[0]).max()),
                       float(abs(result[1][:, keep.numpy()] - expected[1]).max()) if keep.any() else 0.0)
    print(json.dumps({"times": times, "rss_before": rss_before, "peak_rss": peak_rss,
                      "threads": torch.get_num_threads(), "max_abs_diff_mm": max_diff}))


def run_worker(args, implementation, num_frames):
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", implementation, "--n", str(num_frames),
               "--height", str(args.height), "--width", str(args.width), "--repeats", str(args.repeats),
               "--landmarks", str(args.landmarks), "--seed", str(args.seed)]
    if args.tmpdir:
        command += ["--tmpdir", args.tmpdir]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"worker {implementation} N={num_frames} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


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
            result = run_worker(args, implementation, num_frames)
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

    sys.path.insert(0, str(REPO_ROOT))
    from utils.atomic import atomic_path

    csv_path = Path(args.csv)
    if not csv_path.is_absolute():
        csv_path = REPO_ROOT / csv_path
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {csv_path}")


if __name__ == "__main__":
    main()

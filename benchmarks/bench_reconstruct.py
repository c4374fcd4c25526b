"""Seconds and peak memory to reconstruct a 1500-frame 480x640 scan at 0.5 mm (issue 5: under a minute, a few GB).

The scan: a 2025 rotation-protocol trajectory (``simulation.trajectory.rotation_protocol`` on a sampled
forearm phantom: fan, rock, rotate ~90 degrees, fan, rock, ~75 s at 20 fps), so the volume has the
extent of a real scan, with speckle-like frames (Rayleigh grey values inside the probe's sector, 0
outside; the compounding cost does not depend on the grey values), written to a temporary dataset in
the challenge's train layout. ``--data ROOT [--scan KEY]`` measures a dataset's scan instead (e.g. a
``simulate.py --preset tusrec2025`` one).

Each repeat runs in a fresh subprocess (this script re-invoked with ``--worker``), so its peak resident
memory (``ru_maxrss``) is its own. A repeat does what ``reconstruct.py`` does for the ground-truth poses:
read the poses and calibration, build the sector mask (the simulator's probe sector), fit the grid,
compound from the HDF5 file in chunks (``stage compound``), fill holes (``fill``), and write the uint8
volume and its coverage as ``.mha`` (``export``). Reported per stage: the median over repeats and every
time; the peak RSS and its excess over the RSS before the work started; voxels and the sampled and
filled fractions.

Usage (one heavy benchmark at a time on a shared machine)::

    flock /tmp/bench.lock .venv/bin/python benchmarks/bench_reconstruct.py --repeats 3 --threads 2
    .venv/bin/python benchmarks/bench_reconstruct.py --frames 300 --repeats 1        # a quick look
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, so the repository root is not on the path; benchmarks.common and utils need it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import peak_rss_bytes, repo_path, rss_bytes, run_worker  # noqa: E402

STAGES = ("setup", "compound", "fill", "export")


def make_scan(root: Path, num_frames: int, height: int, width: int, seed: int) -> None:
    """Write a rotation-protocol scan with speckle-like frames to ``root`` (train layout, one scan)."""
    import numpy as np

    from simulation import dataset as D
    from simulation import trajectory as T
    from utils.calibration import write_calib_matrices
    from utils.challenge_data import write_scan

    rng = np.random.default_rng(seed)
    preset = D.get_preset("tusrec2025", frames=num_frames, height=height, width=width, subjects=1)
    scale, calib_r_t = D.scaled_calibration(height, width)
    geometry = D.make_geometry(preset, scale)
    phantom = D.default_phantom_factory(rng, "LH")
    trajectory = T.rotation_protocol(rng, phantom.skin_surface, geometry, num_frames)
    sector = geometry.sector_mask()
    frames = np.zeros((num_frames, height, width), np.uint8)
    for i in range(num_frames):  # Rayleigh speckle, mean grey ~60, as muscle on the simulated frames
        frames[i][sector] = np.minimum(rng.rayleigh(48.0, int(sector.sum())), 255).astype(np.uint8)
    tforms = D.random_camera_pose(rng) @ trajectory.tform_tissue_from_image @ np.linalg.inv(calib_r_t)
    write_calib_matrices(root / "calib_matrix.csv", scale, calib_r_t)
    write_scan(root, 0, "LH_rotation", frames, tforms)


def worker(args) -> None:
    """One reconstruction of the scan in this process; prints a JSON line of times and memory."""
    import numpy as np
    import torch

    from utils import reconstruction as rec
    from utils import transform as tf
    from utils.calibration import load_calibration
    from utils.challenge_data import CALIB_FILE, ScanFile, find_scans

    torch.set_num_threads(args.threads)
    rec._numba_kernel()(np.zeros((1, 1, 1), np.uint8), np.zeros(0, np.int32), np.zeros(0, np.int32),
                        np.zeros(0, np.int32), np.zeros((1, 3, 3)), 1, 1, 1, np.zeros(1, np.float32),
                        np.zeros(1, np.int32))  # compile (or load the cache) before the clock starts
    rss_before = rss_bytes()
    times = {}
    root = Path(args.data)
    refs = find_scans(root)
    ref = next(r for r in refs if args.scan in (None, r.key, r.name))
    out_dir = Path(args.out_dir)
    t0 = time.perf_counter()
    calibration = load_calibration(root / CALIB_FILE)
    with ScanFile(ref) as scan_file:
        tforms = torch.from_numpy(scan_file.read_tforms().astype(np.float64))
        global_true = tf.global_transforms(tforms, torch.from_numpy(np.array(calibration.calib_R_T)))
        height, width = scan_file.frame_size
        mask = rec.probe_sector_mask(height, width, calibration.pixel_size_mm)
        grid = rec.fit_grid(rec.frames_to_reference(global_true, scan_file.num_frames),
                            rec.mask_outline_mm(mask, calibration.scale), args.spacing)
        t1 = time.perf_counter()
        sums, counts = rec.compound(scan_file, global_true, calibration.scale, grid, mask, chunk=args.chunk,
                                    backend=args.backend, threads=args.threads)
        t2 = time.perf_counter()
        volume = rec.volume_from_accumulators(sums, counts, grid, fill_radius=args.fill_radius)
        del sums, counts
        t3 = time.perf_counter()
        rec.write_volume(out_dir / "volume.mha", rec.to_uint8(volume.values), grid)
        rec.write_volume(out_dir / "coverage.mha", volume.coverage, grid)
        t4 = time.perf_counter()
        num_frames = scan_file.num_frames
    times = {"setup": t1 - t0, "compound": t2 - t1, "fill": t3 - t2, "export": t4 - t3}
    coverage = np.bincount(volume.coverage.ravel(), minlength=3) / grid.num_voxels
    print(json.dumps({"times": times, "rss_before": rss_before, "peak_rss": peak_rss_bytes(),
                      "threads": torch.get_num_threads(), "frames": num_frames, "height": height, "width": width,
                      "size": list(grid.size), "voxels": grid.num_voxels, "sampled": float(coverage[2]),
                      "filled": float(coverage[1]), "mask_pixels": int(mask.sum())}))


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=1500, help="frames of the generated scan")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--spacing", type=float, default=0.5, help="voxel size (mm)")
    parser.add_argument("--fill-radius", type=float, default=2.0, help="hole filling reach (voxels)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (numba compounding and torch)")
    parser.add_argument("--backend", default="auto", choices=("auto", "numba", "torch"))
    parser.add_argument("--chunk", type=int, default=64, help="frames per chunk")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=None, help="measure a scan of this dataset root instead of generating one")
    parser.add_argument("--scan", default=None, help="with --data: the scan's key or name (default: the first)")
    parser.add_argument("--tmpdir", default=None, help="where the generated scan and the volumes go")
    parser.add_argument("--csv", default="results/bench/bench_reconstruct.csv", help="table (relative to the repo)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.worker:
        worker(args)
        return
    work = Path(tempfile.mkdtemp(prefix="bench_reconstruct_", dir=args.tmpdir))
    try:
        data = args.data
        if data is None:
            data = work / "data"
            started = time.perf_counter()
            make_scan(data, args.frames, args.height, args.width, args.seed)
            print(f"generated a {args.frames}-frame {args.height}x{args.width} rotation scan in "
                  f"{time.perf_counter() - started:.1f} s", flush=True)
        results = []
        for repeat in range(args.repeats):
            out_dir = work / f"out{repeat}"
            out_dir.mkdir()
            worker_args = ["--worker", "--data", data, "--out-dir", out_dir, "--spacing", args.spacing,
                           "--fill-radius", args.fill_radius, "--threads", args.threads, "--backend", args.backend,
                           "--chunk", args.chunk]
            if args.scan:
                worker_args += ["--scan", args.scan]
            results.append(run_worker(__file__, worker_args, f"repeat {repeat}"))
            r = results[-1]
            print(f"repeat {repeat}: " + ", ".join(f"{k} {v:.2f} s" for k, v in r["times"].items())
                  + f", total {sum(r['times'].values()):.2f} s, peak RSS {r['peak_rss'] / 2**30:.2f} GiB", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    first = results[0]
    totals = [sum(r["times"].values()) for r in results]
    row = {
        "N": first["frames"], "HxW": f"{first['height']}x{first['width']}", "spacing_mm": args.spacing,
        "grid": "x".join(map(str, first["size"])), "voxels_M": round(first["voxels"] / 1e6, 2),
        "sampled": round(first["sampled"], 3), "filled": round(first["filled"], 3),
        "pixels_M": round(first["frames"] * first["mask_pixels"] / 1e6, 1),
    }
    for stage in STAGES:
        row[f"{stage}_s"] = round(statistics.median(r["times"][stage] for r in results), 2)
    row["total_s"] = round(statistics.median(totals), 2)
    row["totals_s"] = ";".join(f"{t:.2f}" for t in totals)
    row["peak_rss_GiB"] = round(statistics.median(r["peak_rss"] for r in results) / 2**30, 2)
    row["peak_minus_start_GiB"] = round(statistics.median(r["peak_rss"] - r["rss_before"] for r in results) / 2**30, 2)
    row["threads"] = first["threads"]
    row["backend"] = args.backend
    print()
    for key, value in row.items():
        print(f"{key:>22}: {value}")

    from utils.atomic import atomic_path

    csv_path = repo_path(args.csv)
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
    print(f"wrote {csv_path}")


if __name__ == "__main__":
    main()

"""Speed and memory of the simulator (DESIGN.md section 6: a 1500-frame 480x640 scan in under a minute
on 2 cores; SIMULATOR.md's target 15-25 s).

One 2025 rotation scan of a sampled phantom at the default density (10 scatterers/mm^3, or
``--density``), the real pipeline of ``simulation.dataset``:

- ``setup``: phantom, the 1500-frame trajectory, scatterers over the region the scan sweeps, the
  attenuation medium and the renderer (measured once; it is paid once per arm);
- ``single``: frames per second rendered in this process with one thread (after one warm-up frame
  that compiles the kernels), on ``--single-frames`` frames spread over the scan;
- ``parallel``: ``render_frames`` with ``--workers`` forked processes on ``--frames`` frames spread
  over the scan, and the seconds per 1500-frame scan: ``setup + rendering x 1500 / frames +
  landmarks (100, measured: their cost does not depend on N) + writing x 1500 / frames`` (printed
  as measured or extrapolated);
- memory: this process's peak RSS, and per worker the peak RSS (which counts the scatterer pages it
  shares copy-on-write with the parent) and the USS (its own pages) at its last chunk.

Usage (one heavy benchmark at a time on a shared machine)::

    flock /tmp/bench.lock .venv/bin/python benchmarks/bench_simulate.py --frames 200
    .venv/bin/python benchmarks/bench_simulate.py --frames 1500      # measure a whole scan
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from simulation import dataset as D  # noqa: E402

SCAN_FRAMES = 1500


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _measured_chunk(task):
    """``dataset._render_chunk`` plus this worker's memory: (start, frames, pid, peak RSS MB, USS MB or None)."""
    import psutil

    *task, measure = task
    start, frames = D._render_chunk(tuple(task))
    # USS reads /proc/<pid>/smaps (tens of ms for a 1 GB process): only on the last chunks.
    uss = psutil.Process().memory_full_info().uss / 2**20 if measure else None
    return start, frames, os.getpid(), _peak_rss_mb(), uss


def render_parallel(renderer, poses, seeds, shape, workers, chunk=4):
    """Like ``dataset.render_frames`` (fork, one thread per worker) but reporting per-worker memory."""
    frames = np.empty((len(poses), *shape), np.uint8)
    starts = range(0, len(poses), chunk)
    tasks = [(s, poses[s:s + chunk], seeds[s:s + chunk], k >= len(starts) - 2 * workers) for k, s in enumerate(starts)]
    D._WORKER_RENDERER, D._WORKER_RENDERER_SHAPE = renderer, tuple(shape)
    memory = {}
    try:
        with multiprocessing.get_context("fork").Pool(workers, initializer=D._limit_threads) as pool:
            for start, block, pid, rss, uss in pool.imap_unordered(_measured_chunk, tasks):
                frames[start:start + len(block)] = block
                previous = memory.get(pid, (0.0, None))
                memory[pid] = (max(previous[0], rss), uss if uss is not None else previous[1])
    finally:
        D._WORKER_RENDERER = None
    return frames, memory


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=200,
                        help=f"frames rendered by the parallel run (1..{SCAN_FRAMES}); fewer are extrapolated")
    parser.add_argument("--single-frames", type=int, default=30, help="frames rendered by the single-thread run")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--density", type=float, default=D.Preset().density, help="scatterers per mm^3")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 1 <= args.frames <= SCAN_FRAMES or args.single_frames < 1 or args.workers < 1:
        parser.error(f"--frames must be in 1..{SCAN_FRAMES}, --single-frames and --workers >= 1")

    D._limit_threads()  # the single-thread figure is one core's
    preset = D.get_preset("tusrec2025", height=args.height, width=args.width, density=args.density)
    scale, _ = D.scaled_calibration(preset.height, preset.width)
    geometry = D.make_geometry(preset, scale)
    shape = (preset.height, preset.width)

    t0 = time.perf_counter()
    phantom = D.default_phantom_factory(D._rng(args.seed, 0, D._PHANTOM), "RH")
    traj = D.make_trajectory(D._rng(args.seed, 0, D._TRAJECTORY, 1), phantom, geometry, preset, "RH_rotation")
    t1 = time.perf_counter()
    region = D._scan_region([traj], geometry)
    scatterers = phantom.make_scatterers(preset.density, D._rng(args.seed, 0, D._SCATTERERS, 1), region=region)
    t2 = time.perf_counter()
    medium = D._medium(phantom, region, preset.medium_spacing)
    t3 = time.perf_counter()
    renderer = D.default_renderer_factory(geometry, scatterers, medium, preset.density)
    t4 = time.perf_counter()
    setup = t4 - t0
    print(f"setup {setup:.2f} s: phantom + trajectory {t1 - t0:.2f} s, {len(scatterers) / 1e6:.2f} M scatterers "
          f"{t2 - t1:.2f} s ({scatterers.positions.nbytes * 2.5 / 2**20:.0f} MB), medium {t3 - t2:.2f} s, "
          f"renderer {t4 - t3:.2f} s", flush=True)

    poses = traj.tform_tissue_from_image
    seeds = np.arange(len(poses), dtype=np.int64)
    t = time.perf_counter()
    renderer.render(poses[0], 0)  # compiles (or loads the cached) kernels
    print(f"warm-up frame {time.perf_counter() - t:.2f} s", flush=True)

    single = np.linspace(0, len(poses) - 1, args.single_frames).round().astype(int)
    t = time.perf_counter()
    for k in single:
        renderer.render(poses[k], int(seeds[k]))
    single_s = time.perf_counter() - t
    single_fps = len(single) / single_s
    print(f"single thread: {len(single)} frames {shape[0]}x{shape[1]} in {single_s:.2f} s = {single_fps:.1f} frames/s "
          f"({1000 / single_fps:.0f} ms/frame), peak RSS {_peak_rss_mb():.0f} MB", flush=True)

    subset = np.linspace(0, len(poses) - 1, args.frames).round().astype(int)
    t = time.perf_counter()
    frames, memory = render_parallel(renderer, poses[subset], seeds[subset], shape, args.workers)
    parallel_s = time.perf_counter() - t
    # Landmarks cost per landmark (K = 100 label grids), not per frame; writing scales with N.
    t = time.perf_counter()
    D.sim_landmarks.select_landmarks(np.random.default_rng(0), frames, poses[subset], phantom.labels, scale,
                                     geometry.sector_mask(), preset.landmarks, stride=2,
                                     label_categories=D._label_categories(phantom))
    landmarks_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        D.write_scan(tmp, 0, "RH_rotation", frames, np.broadcast_to(np.eye(4), (len(frames), 4, 4)))
        write_s = (time.perf_counter() - t) * SCAN_FRAMES / args.frames
    render_s = parallel_s * SCAN_FRAMES / args.frames
    per_scan = setup + render_s + landmarks_s + write_s
    how = "measured" if args.frames == SCAN_FRAMES else f"rendering and writing extrapolated from {args.frames} frames"
    print(f"{args.workers} workers: {args.frames} frames in {parallel_s:.2f} s = {args.frames / parallel_s:.1f} frames/s")
    print(f"seconds per {SCAN_FRAMES}-frame scan: {per_scan:.1f} s ({how}): setup {setup:.1f} s + rendering "
          f"{render_s:.1f} s + {preset.landmarks} landmarks {landmarks_s:.1f} s (measured) + writing {write_s:.1f} s; "
          "target <= 25 s")
    for pid, (rss, uss) in sorted(memory.items()):
        uss_text = "n/a" if uss is None else f"{uss:.0f} MB"
        print(f"worker {pid}: peak RSS {rss:.0f} MB (shared pages included), USS {uss_text} (its own pages)")
    print(json.dumps({"height": shape[0], "width": shape[1], "density": preset.density, "setup_s": setup,
                      "single_fps": single_fps, "workers": args.workers, "parallel_frames": args.frames,
                      "parallel_s": parallel_s, "landmarks_s": landmarks_s, "write_s": write_s, "scan_s": per_scan, "scan_s_measured": args.frames == SCAN_FRAMES,
                      "parent_peak_rss_mb": _peak_rss_mb(),
                      "worker_peak_rss_mb": max((m[0] for m in memory.values()), default=None),
                      "worker_uss_mb": max((m[1] for m in memory.values() if m[1] is not None), default=None)}))


if __name__ == "__main__":
    main()

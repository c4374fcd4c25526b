"""Reconstruct scans into 3D volumes: frames + transforms (tracked or predicted) -> .mha / .nii.gz, slices, scores.

For every selected scan of a dataset (either challenge layout), this

1. reconstructs a volume with the ground-truth poses (``T_{0<-i}`` from the tracker) and, when given,
   with predicted poses (``--transforms FILE``, any method's global transforms) or a simulated drifting
   prediction (``--drift``, the kind of error a trackerless network makes), all on one voxel grid in
   the first frame's image mm (or an oriented box, ``--grid obb``);
2. writes each as ``.mha`` and ``.nii.gz`` (uint8 grey values by default) with a coverage volume
   (2 = reached by pixels, 1 = hole filled, 0 = no data), optionally the bright voxels as a PLY point
   cloud (``--points``);
3. compares predicted with ground-truth volumes (normalised cross-correlation in their common
   coverage) and draws orthogonal mid-slices side by side (``<key>_slices.png``);
4. on simulated scans (which keep their phantom in ``<root>/simulation/``), extracts the bone surface
   from the frames (bright ridge above its shadow) and reports the mean and 95th-percentile distance to
   the phantom's true radius and ulna surfaces, placed with each set of poses;
5. writes ``summary.csv`` (one row per scan and pose source), ``summary.json`` and ``log.txt`` into a new
   ``results/<NNN>-reconstruct/``.

Every input (the scans, the transforms files, the mask, the grid's size, the checkpoint) is checked before
the run folder is made, and a run that fails before writing any result removes its folder: a bad input
gives one line on stderr and leaves no numbered folder behind.

Examples::

    python reconstruct.py --data data/sim --scan 000/LH_rotation
    python reconstruct.py --data data/sim --scan 000/LH_rotation --drift            # what drift does
    python reconstruct.py --data data/sim --scan sub000__LH_rotation --transforms pred.npy
    python reconstruct.py --data ../shared/realdata/plus_spine_phantom --spacing 0.25

``summary.csv`` columns: grid size and spacing, ``compound_s`` / ``fill_s`` (seconds), the sampled and
filled fractions of the grid's voxels; for predictions ``ncc`` (normalised cross-correlation with the
ground-truth volume where both have data), ``overlap_fraction`` (intersection over union of the two
coverages), ``mean_abs_difference`` (grey levels) and ``outline_error_mean_mm`` (mean distance between
the sector outline's vertices placed with predicted and with true poses, over all frames: the pose
error in mm, largest at the sector's deep corners); on simulated scans ``bone_count``, ``bone_mean_mm``,
``bone_median_mm``, ``bone_p95_mm``.

``--transforms``: ``.npy`` [N-1, 4, 4] global transforms ``T_{0<-i}``, i = 1..N-1 (what
``utils.prediction.predict_scan_transforms`` returns first, saved with ``numpy.save``) or [N, 4, 4] one per
frame; or ``.h5`` with a ``global_transforms`` dataset (or ``tforms`` tracker poses); or a folder holding
``<key>.npy`` / ``<key>.h5`` per scan (key ``sub<NNN>__<scan>``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from utils.cli import run_cli  # noqa: E402  (after REPO_ROOT is on sys.path)
from utils.errors import InputError  # noqa: E402

log = logging.getLogger("reconstruct")

FORMATS = ("mha", "nii.gz", "nii", "nrrd")


def get_args_parser() -> argparse.ArgumentParser:
    from utils.reconstruction import BACKENDS, GRID_FITS, MASK_SOURCES

    parser = argparse.ArgumentParser(prog="reconstruct.py", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", "--DATA_PATH", dest="data", type=Path, required=True,
                        help="dataset root (train or validation/test layout)")
    parser.add_argument("--scan", action="append", default=None,
                        help="scan to reconstruct: NNN/name, sub<NNN>__name or a unique name; repeat for "
                             "several (default: every scan)")
    parser.add_argument("--transforms", type=Path, default=None,
                        help="predicted global transforms: .npy/.h5 file (one scan) or a folder of <key>.npy/.h5")
    parser.add_argument("--ckpt", type=Path, default=None,
                        help="predict the transforms with this training checkpoint (utils.evaluation.predict_transforms)")
    parser.add_argument("--drift", action="store_true",
                        help="also reconstruct a simulated drifting prediction (simulation.drift.drifting_prediction)")
    parser.add_argument("--drift-bias", type=float, default=0.9, help="predicted motion = bias x true motion + noise")
    parser.add_argument("--drift-noise-mm", type=float, default=0.03, help="per-frame translation noise (mm)")
    parser.add_argument("--drift-noise-rad", type=float, default=0.002, help="per-frame rotation noise (rad)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the drifting prediction")
    parser.add_argument("--spacing", type=float, nargs="+", default=[0.5], help="voxel size in mm (1 or 3 values)")
    parser.add_argument("--grid", choices=GRID_FITS, default="frame0",
                        help="frame0: axes of the first frame's image mm; obb: principal axes of the sweep")
    parser.add_argument("--margin", type=float, default=0.0, help="mm added around the swept sector")
    parser.add_argument("--mask", default="auto",
                        help=f"sector mask: one of {list(MASK_SOURCES)} or a .npy/.png file of H x W; auto = the "
                             "simulator's probe sector for simulated scans, else from the frames")
    parser.add_argument("--fill-radius", type=float, default=2.0, help="hole filling reach in voxels (0: off)")
    parser.add_argument("--fill-sigma", type=float, default=None, help="hole filling Gaussian sigma in voxels")
    parser.add_argument("--formats", nargs="*", choices=FORMATS, default=["mha", "nii.gz"],
                        help="volume files to write (none: only scores and pictures)")
    parser.add_argument("--dtype", choices=("uint8", "float32"), default="uint8", help="voxel type of the volumes")
    parser.add_argument("--points", type=_grey_or_percentile, default=None, metavar="GREY",
                        help="also write the voxels >= GREY (a grey level, or pNN: the NN-th percentile of the "
                             "volume's covered voxels, e.g. p99.5) as a PLY point cloud per volume")
    parser.add_argument("--bone-score", choices=("auto", "on", "off"), default="auto",
                        help="bone-surface distances (simulated scans only; auto: when the phantom is known)")
    parser.add_argument("--frame-step", type=int, default=1, help="bone score: use every n-th frame")
    parser.add_argument("--device", default="cpu", help="torch device for compounding and hole filling")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="compounding loop (auto: numba on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--chunk", type=int, default=64, help="frames read and compounded at a time")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results", help="root of the run folders")
    parser.add_argument("--name", default="reconstruct", help="run folder name (results/<NNN>-<name>)")
    return parser


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _grey_or_percentile(text: str):
    """``--points``: a grey level (float) or ``("percentile", q)`` from ``pNN``."""
    try:
        if text.lower().startswith("p"):
            value = float(text[1:])
            if not 0 <= value <= 100:
                raise ValueError
            return ("percentile", value)
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a grey level (e.g. 180) or a percentile (e.g. p99.5)") from None


def select_scans(refs, wanted):
    """The refs matching ``wanted`` (``NNN/name``, ``sub<NNN>__name`` or a unique name), in the given order."""
    if not wanted:
        return list(refs)
    chosen = []
    for text in wanted:
        matches = [r for r in refs if text in (r.key, f"{r.subject_folder}/{r.name}", f"{r.subject:03d}/{r.name}")]
        if not matches:
            matches = [r for r in refs if r.name == text]
        if len(matches) != 1:
            known = ", ".join(r.key for r in refs[:12]) + (" ..." if len(refs) > 12 else "")
            what = "matches no scan" if not matches else f"is ambiguous ({len(matches)} scans)"
            raise InputError(f"--scan {text!r} {what}; scans: {known}")
        chosen.append(matches[0])
    return chosen


def _transforms_path(path: Path, ref) -> Path:
    """The transforms file of scan ``ref``: ``path`` itself, or ``path/<key>.npy|.h5`` for a folder."""
    if path.is_dir():
        for suffix in (".npy", ".h5", ".hdf5"):
            candidate = path / f"{ref.key}{suffix}"
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"--transforms {path}: no {ref.key}.npy or {ref.key}.h5 for scan {ref.key}")
    return path


def _mask_spec(spec: str, ref, root: Path) -> str:
    """``--mask`` for scan ``ref`` with ``auto`` resolved: the simulator's probe sector where the
    phantom is known (a simulated scan), else the field seen in the frames."""
    from utils.bone_surface import side_file_of

    if spec != "auto":
        return spec
    return "probe" if side_file_of(root, ref.subject, ref.name).is_file() else "frames"


def _load_mask(spec: str, scan_file, calibration):
    """(bool [H, W] mask, its source) for a resolved ``--mask`` (``_mask_spec``); ``frames`` reads every frame."""
    import numpy as np

    from utils import reconstruction as rec

    height, width = scan_file.frame_size
    if spec == "probe":
        return rec.probe_sector_mask(height, width, calibration.pixel_size_mm), "probe"
    if spec == "frames":
        return rec.mask_from_frames(scan_file), "frames"
    if spec == "none":
        return np.ones((height, width), dtype=bool), "none"
    path = Path(spec)
    if not path.is_file():
        raise InputError(f"--mask {spec!r} is not one of {list(rec.MASK_SOURCES)} nor an existing file")
    if path.suffix.lower() == ".npy":
        mask = np.load(path, allow_pickle=False)
    else:
        from matplotlib.image import imread

        mask = imread(path)
        mask = mask[..., 0] if mask.ndim == 3 else mask
    mask = np.asarray(mask) > 0
    if mask.shape != (height, width):
        raise InputError(f"--mask {path}: shape {mask.shape}, but frames are {(height, width)}")
    return mask, str(path)


def _check_spacing(spacing: list) -> None:
    """Refuse a ``--spacing`` that is no voxel size (0, negative, nan, inf) before any work."""
    if not all(math.isfinite(value) and value > 0 for value in spacing):
        raise InputError(f"--spacing {' '.join(str(v) for v in spacing)}: expected 1 or 3 positive, finite "
                         "voxel sizes in mm (e.g. --spacing 0.5)")


def _setup_logging(run_dir: Path) -> logging.Handler:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    log.setLevel(logging.INFO)
    handler = logging.FileHandler(run_dir / "log.txt", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _discard_if_empty(run_dir: Path) -> None:
    """Remove a failed run's folder when it holds nothing but ``log.txt``.

    A numbered folder without results would pass for a run (and take the next number); the error
    itself is on stderr. A folder with any result (an earlier scan's volumes) stays, log included.
    """
    with contextlib.suppress(OSError):  # never hide the error that ended the run
        if {p.name for p in run_dir.iterdir()} <= {"log.txt"}:
            (run_dir / "log.txt").unlink(missing_ok=True)
            run_dir.rmdir()


# --------------------------------------------------------------------------------------------
# Before the run folder: every scan's poses, mask and grid
# --------------------------------------------------------------------------------------------

SOURCE_ORDER = ("true", "pred", "drift")  # rows of summary.csv and of the slice pictures


@dataclass
class ScanPlan:
    """One scan, read and checked before the run folder is made (``plan_scan``).

    Attributes:
        ref: the scan (``utils.challenge_data.ScanRef``).
        sources: ``{label: float64 [N, 4, 4]}`` frame i's image mm -> reference mm (frame 0's image
            mm) for the poses known before the run: ``true`` (tracker), ``pred`` (``--transforms``),
            ``drift``; a ``--ckpt`` prediction is added while reconstructing.
        transforms_path: the ``--transforms`` file read for this scan, or None.
        mask: bool [H, W] sector mask, or None: from the frames, computed while reconstructing.
        mask_source: ``probe``, ``frames``, ``none`` or the mask file.
    """

    ref: object
    sources: dict
    transforms_path: Path | None
    mask: object
    mask_source: str


def _drift_source(tforms, calib, ref, args):
    """float64 [N, 4, 4]: a drifting prediction of the tracker poses ``tforms`` [N, 4, 4] (``--drift``)."""
    import numpy as np

    from simulation.drift import drifting_prediction
    from utils import reconstruction as rec
    from utils import transform as tf

    # Seeded per scan, so a scan's drift does not depend on which other scans were selected.
    rng = np.random.default_rng([args.seed, ref.subject, sum(map(ord, ref.name))])
    local = drifting_prediction(tf.local_transforms(tforms, calib), rng, args.drift_bias, args.drift_noise_mm,
                                args.drift_noise_rad)
    return rec.frames_to_reference(tf.chain_local_transforms(local), len(tforms))


def _fit_grid(ref, sources: dict, mask, calibration, args):
    """The grid holding every source's sector: one grid for all, so their volumes compare voxel by voxel."""
    from utils import reconstruction as rec

    try:
        return rec.fit_grid(list(sources.values()), rec.mask_outline_mm(mask, calibration.scale), args.spacing,
                            args.grid, args.margin)
    except InputError as error:
        raise InputError(f"scan {ref.key}: {error}") from None


def plan_scan(ref, root: Path, calibration, args) -> ScanPlan:
    """Read and check what reconstructing ``ref`` needs, so bad input is refused before the run folder.

    Reads the tracker poses, the ``--transforms`` file (shape, finite, rigid) and the drift, loads
    the mask and checks the grid against the voxel limit. A mask from the frames reads every frame,
    the slow part of a scan: it is computed here only when the whole frame (which holds any mask)
    gives a grid over the limit, so that the limit is never applied to a mask larger than the real one.
    """
    import numpy as np
    import torch

    from utils import reconstruction as rec
    from utils import transform as tf
    from utils.challenge_data import ScanFile

    with ScanFile(ref) as scan_file:
        num = scan_file.num_frames
        height, width = scan_file.frame_size
        tforms = torch.from_numpy(scan_file.read_tforms().astype(np.float64))
        calib = torch.from_numpy(np.array(calibration.calib_R_T))
        sources = {"true": rec.frames_to_reference(tf.global_transforms(tforms, calib), num)}
        transforms_path = None
        if args.transforms is not None:
            transforms_path = _transforms_path(args.transforms, ref)
            sources["pred"] = rec.read_transforms_file(transforms_path, num, calibration.calib_R_T)
        if args.drift:
            sources["drift"] = _drift_source(tforms, calib, ref, args)
        spec = _mask_spec(args.mask, ref, root)
        mask = None
        if spec == "frames":
            try:
                _fit_grid(ref, sources, np.ones((height, width), dtype=bool), calibration, args)
            except InputError:  # over the limit with the whole frame: the real mask decides
                mask, spec = _load_mask(spec, scan_file, calibration)
        else:
            mask, spec = _load_mask(spec, scan_file, calibration)
        if mask is not None:
            _fit_grid(ref, sources, mask, calibration, args)
    return ScanPlan(ref, sources, transforms_path, mask, spec)


# --------------------------------------------------------------------------------------------
# One scan
# --------------------------------------------------------------------------------------------


def reconstruct_one(plan: ScanPlan, root: Path, calibration, args, run_dir: Path) -> list[dict]:
    """Reconstruct, export, compare and score one scan (checked by ``plan_scan``); returns its summary rows."""
    import numpy as np

    from utils import bone_surface as bones
    from utils import reconstruction as rec
    from utils.challenge_data import ScanFile

    ref = plan.ref
    rows = []
    with ScanFile(ref) as scan_file:
        num = scan_file.num_frames
        height, width = scan_file.frame_size
        sources = dict(plan.sources)
        if plan.transforms_path is not None:
            log.info("%s: predicted transforms from %s", ref.key, plan.transforms_path)
        if args.predictor is not None:
            from utils.evaluation import predict_transforms

            model, settings = args.predictor
            global_pred, _, seconds = predict_transforms(model, scan_file.read_frames(), settings, calibration.scale,
                                                         args.device)
            sources["pred"] = rec.frames_to_reference(global_pred, num)
            log.info("%s: transforms predicted by %s in %.1f s", ref.key, args.ckpt, seconds)
        sources = {label: sources[label] for label in SOURCE_ORDER if label in sources}

        started = time.perf_counter()
        mask, mask_source = plan.mask, plan.mask_source
        if mask is None:
            mask, mask_source = _load_mask(mask_source, scan_file, calibration)
        grid = _fit_grid(ref, sources, mask, calibration, args)
        log.info("%s: %d frames of %dx%d, mask %s (%.0f %% of the frame), grid %s voxels of %s mm (%.1f M)",
                 ref.key, num, height, width, mask_source, 100 * mask.mean(), list(grid.size),
                 [round(float(v), 3) for v in grid.spacing], grid.num_voxels / 1e6)
        volumes, timings = {}, {}
        for label, to_reference in sources.items():
            t0 = time.perf_counter()
            sums, counts = rec.compound(scan_file, to_reference, calibration.scale, grid, mask, chunk=args.chunk,
                                        device=args.device, backend=args.backend, threads=args.threads,
                                        progress=True)
            t1 = time.perf_counter()
            volumes[label] = rec.volume_from_accumulators(sums, counts, grid, args.fill_radius, args.fill_sigma)
            del sums, counts
            t2 = time.perf_counter()
            timings[label] = (t1 - t0, t2 - t1)
            coverage = np.bincount(volumes[label].coverage.ravel(), minlength=3) / grid.num_voxels
            log.info("%s %s: compounded in %.1f s, holes filled in %.1f s; voxels sampled %.1f %%, filled %.1f %%",
                     ref.key, label, t1 - t0, t2 - t1, 100 * coverage[2], 100 * coverage[1])

        bone_pixels = None
        side_path = bones.side_file_of(root, ref.subject, ref.name)
        if args.bone_score == "on" or (args.bone_score == "auto" and side_path.is_file()):
            t0 = time.perf_counter()
            phantom, tissue_from_image = bones.phantom_of_scan(side_path)
            scale = calibration.scale
            bone_pixels = bones.detect_scan_ridges(scan_file, mask, (scale[0, 0], scale[1, 1]),
                                                   frame_step=args.frame_step)
            log.info("%s: %d bone-echo points on %d frames in %.1f s", ref.key, len(bone_pixels[0]),
                     len(np.unique(bone_pixels[0])), time.perf_counter() - t0)
    stem = ref.key
    for label, volume in volumes.items():
        written = []
        for fmt in args.formats:
            values = rec.to_uint8(volume.values) if args.dtype == "uint8" else volume.values
            written.append(rec.write_volume(run_dir / f"{stem}_{label}.{fmt}", values, grid))
            written.append(rec.write_volume(run_dir / f"{stem}_{label}_coverage.{fmt}", volume.coverage, grid))
        if args.points is not None:
            level = args.points
            if isinstance(level, tuple):
                covered = volume.values[volume.covered()]
                level = float(np.percentile(covered, level[1])) if covered.size else float("inf")
            points, values = rec.bright_points(volume, level)
            written.append(rec.write_point_cloud(run_dir / f"{stem}_{label}_points.ply", points, values))
        row = {"scan": ref.key, "poses": label, "frames": num, "height": height, "width": width,
               "mask": mask_source, "size_i": grid.size[0], "size_j": grid.size[1], "size_k": grid.size[2],
               "spacing_mm": float(grid.spacing[0]), "compound_s": timings[label][0], "fill_s": timings[label][1],
               "sampled_fraction": float((volume.coverage == rec.COVERAGE_SAMPLED).mean()),
               "filled_fraction": float((volume.coverage == rec.COVERAGE_FILLED).mean())}
        if label != "true":
            row.update({f"{k}": v for k, v in rec.compare_volumes(volumes["true"], volume).items()})
            corners = rec.mask_outline_mm(mask, calibration.scale)
            moved = (sources[label] @ corners)[:, :3] - (sources["true"] @ corners)[:, :3]
            row["outline_error_mean_mm"] = float(np.linalg.norm(moved, axis=1).mean())
        if bone_pixels is not None:
            points = bones.ridge_points(*bone_pixels, sources[label], calibration.scale)
            distances = bones.bone_distances(points, phantom, tissue_from_image[0])
            summary = bones.distance_summary(distances)
            if args.formats:  # the echoes where these poses put them, with their distance to the true bone
                written.append(rec.write_point_cloud(run_dir / f"{stem}_{label}_bone_points.ply", points, distances,
                                                     value_name="distance_mm"))
            row.update({f"bone_{k}": v for k, v in summary.items()})
            log.info("%s %s: bone surface distance mean %.2f mm, p95 %.2f mm (%d points)", ref.key, label,
                     summary["mean_mm"], summary["p95_mm"], summary["count"])
        rows.append(row)
        log.info("%s %s: wrote %s", ref.key, label, ", ".join(p.name for p in written) or "no files")
    title = f"{ref.key}: " + ", ".join(
        [f"{r['poses']} NCC {r['ncc']:.3f}" for r in rows if "ncc" in r] or ["ground-truth poses"])
    picture = rec.plot_orthogonal_slices(volumes, run_dir / f"{stem}_slices.png", title=title)
    log.info("%s: slices in %s (%.1f s for the scan)", ref.key, picture.name, time.perf_counter() - started)
    return rows


def _write_csv(rows: list[dict], path: Path) -> None:
    from utils.atomic import atomic_path

    columns = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)


def main(argv=None) -> Path:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if len(args.spacing) not in (1, 3):
        parser.error(f"--spacing takes 1 or 3 values, got {len(args.spacing)}")
    _check_spacing(args.spacing)
    if args.frame_step < 1 or args.chunk < 1 or args.fill_radius < 0:
        parser.error("--frame-step and --chunk must be >= 1 and --fill-radius >= 0")
    import torch

    from utils.atomic import atomic_path
    from utils.calibration import load_calibration
    from utils.challenge_data import CALIB_FILE, check_scans, find_scans
    from utils.run_dir import make_run_dir

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    refs = select_scans(find_scans(args.data), args.scan)  # a bad dataset or --scan: one line (run_cli)
    calibration = load_calibration(args.data / CALIB_FILE)
    if args.transforms is not None and not args.transforms.is_dir():
        if not args.transforms.is_file():
            raise FileNotFoundError(f"--transforms {args.transforms}: no such file or folder")
        if len(refs) != 1:
            parser.error(f"--transforms {args.transforms} is one file but {len(refs)} scans are selected: "
                         "pass one --scan, or a folder of <key>.npy / <key>.h5")
    if args.ckpt is not None and args.transforms is not None:
        parser.error("--ckpt and --transforms both give the predicted transforms: choose one")
    # Every input is checked before the run folder is made, so a bad one leaves no empty run behind:
    # the scans' files, poses and landmarks first (headers only: seconds), then per scan the
    # transforms files, the mask and the grid's size. min_frames=1: one frame is a valid (flat) volume.
    check_scans(refs, min_frames=1)
    args.predictor = None
    if args.ckpt is not None:
        from utils.checkpoint import load_checkpoint, model_from_checkpoint
        from utils.evaluation import PredictionSettings

        checkpoint = load_checkpoint(args.ckpt)  # once, for every scan
        args.predictor = (model_from_checkpoint(checkpoint, args.device),
                          PredictionSettings.from_options(checkpoint["options"]))
    plans = [plan_scan(ref, args.data, calibration, args) for ref in refs]
    run_dir = make_run_dir(args.out, args.name)
    handler, finished = None, False
    try:
        handler = _setup_logging(run_dir)
        log.info("run folder: %s; %d scan(s) from %s", run_dir, len(refs), args.data)
        rows = []
        for plan in plans:
            rows += reconstruct_one(plan, args.data, calibration, args, run_dir)
        _write_csv(rows, run_dir / "summary.csv")
        record = {"arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                if k != "predictor"},
                  "rows": rows, "peak_rss_mb": _peak_rss_mb()}
        with atomic_path(run_dir / "summary.json") as tmp:
            tmp.write_text(json.dumps(record, indent=2, default=float))
        log.info("done: %s (peak memory %.0f MB)", run_dir / "summary.csv", record["peak_rss_mb"])
        finished = True
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
        if not finished:  # e.g. a --ckpt prediction's grid over the limit, found after the folder was made
            _discard_if_empty(run_dir)
    return run_dir


if __name__ == "__main__":
    sys.exit(run_cli(main))

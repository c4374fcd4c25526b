"""Write a synthetic TUS-REC dataset in the official layout (DESIGN.md section 3).

Examples::

    python simulate.py --out data/sim --preset demo --seed 0
    python simulate.py --out data/sim2024 --preset tusrec2024 --subjects 2 --layout test --workers 2
    python simulate.py --out data/tiny --preset tiny --preview results/preview
    python simulate.py --out data/sim --preview results/preview --preview-only   # an existing dataset

Presets (``simulation.dataset.PRESETS``): ``tusrec2025`` (2 rotation scans per subject, 1500 frames,
480x640, 100 landmarks), ``tusrec2024`` (24 sweeps per subject, 20 landmarks), ``demo`` (6 subjects x
2 scans x 200 frames) and ``tiny`` (tests). ``--subjects``, ``--frames``, ``--height``/``--width``,
``--protocol`` and ``--habit`` override the preset. The output folder must be empty or absent unless
``--overwrite``, which first removes the dataset files a previous run wrote there (and nothing else).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from utils.cli import run_cli  # noqa: E402  (after REPO_ROOT is on sys.path)

logger = logging.getLogger("simulate")

# What a generated dataset consists of: --overwrite removes exactly these names.
DATASET_ENTRIES = ("frames_transfs", "frames", "transfs", "landmarks", "landmark", "simulation",
                   "dataset_keys.h5", "calib_matrix.csv")


def _bounded_int(low: int, high: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in {low}..{high}"
            raise argparse.ArgumentTypeError(f"{value} is out of range: expected an integer {bound}")
        return value
    return parse


def get_args_parser() -> argparse.ArgumentParser:
    from simulation.dataset import PRESETS, PROTOCOLS
    from utils.challenge_data import LAYOUTS

    parser = argparse.ArgumentParser(prog="simulate.py",
                                     description="Write a synthetic TUS-REC dataset (simulated forearm scans).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="dataset root to write (or to preview)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="what the dataset holds")
    parser.add_argument("--seed", type=_bounded_int(0), default=0, help="everything follows from it")
    parser.add_argument("--layout", choices=LAYOUTS, default="train",
                        help="train: frames_transfs/; test: frames/ + transfs/ + dataset_keys.h5")
    parser.add_argument("--subjects", type=_bounded_int(1), default=None, help="override the preset's subject count")
    parser.add_argument("--frames", type=_bounded_int(2), default=None, help="override frames per scan")
    parser.add_argument("--height", type=_bounded_int(16, 4096), default=None, help="frame rows (pixel size scaled)")
    parser.add_argument("--width", type=_bounded_int(16, 4096), default=None, help="frame columns (pixel size scaled)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default=None,
                        help="rotation (2025 LH/RH_rotation) or sweeps (2024's 24 scans)")
    parser.add_argument("--habit", type=float, default=None,  # its range is the Preset's to check
                        help="rotation scans: probability that each fan, rock and turn goes the sonographer's "
                             "habitual way (0.5: no habit, the preset's default; README, direction cues)")
    parser.add_argument("--workers", type=_bounded_int(1, 256), default=min(2, os.cpu_count() or 1),
                        help="render processes (one thread each)")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    parser.add_argument("--preview", type=Path, default=None, help="write frame montages and trajectory plots here")
    parser.add_argument("--preview-only", action="store_true", help="do not generate: preview the dataset in --out")
    return parser


def _check_output(parser, out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            parser.error(f"--out {out} is not empty; pass --overwrite to replace the dataset there")
        for name in DATASET_ENTRIES:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()


def main(argv=None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)

    from simulation.dataset import generate_dataset, get_preset
    from simulation.preview import write_preview

    if (args.height is None) != (args.width is None):
        parser.error("--height and --width go together (the pixel size is scaled so H x W spans the probe's field of view)")
    if args.preview_only:
        if args.preview is None:
            parser.error("--preview-only needs --preview DIR")
        if not args.out.is_dir():
            parser.error(f"--preview-only: dataset {args.out} does not exist")
    else:
        try:
            preset = get_preset(args.preset, subjects=args.subjects, frames=args.frames, height=args.height,
                                width=args.width, protocol=args.protocol, habit=args.habit)
        except ValueError as error:
            parser.error(str(error))
        _check_output(parser, args.out, args.overwrite)
        logger.info("writing %s (%s layout): %d subject(s) x %s, %s frames of %dx%d, seed %d, %d worker(s)",
                    args.out, args.layout, preset.subjects, "2 rotation scans" if preset.protocol == "rotation"
                    else "24 sweeps", preset.frames or "natural", preset.height, preset.width, args.seed, args.workers)
        try:
            refs = generate_dataset(args.out, args.preset, seed=args.seed, layout=args.layout, workers=args.workers,
                                    progress=sys.stderr.isatty(), subjects=args.subjects, frames=args.frames,
                                    height=args.height, width=args.width, protocol=args.protocol, habit=args.habit)
        except ValueError as error:  # e.g. a sweep that cannot fit the drawn arm; files written so far stay
            parser.exit(1, f"{parser.prog}: error: {error}\n")
        logger.info("wrote %d scan(s) to %s", len(refs), args.out)
    if args.preview is not None:
        try:
            paths = write_preview(args.out, args.preview)
        except (FileNotFoundError, ValueError) as error:  # not a dataset, or a malformed one
            parser.exit(1, f"{parser.prog}: error: cannot preview {args.out}: {error}\n")
        logger.info("wrote %d preview image(s) to %s", len(paths), args.preview)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

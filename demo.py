"""The main job in a few minutes on 2 CPU cores: simulate a dataset, train, predict whole scans, score.

What ``make demo`` runs:

1. simulates the ``demo`` dataset in the challenge's train layout (``simulate.py``'s ``demo`` preset
   with 10 subjects: 10 digital forearms x 2 rotation scans x 200 frames of 480x640, real
   calibration, landmarks on anatomy; folds of 2 subjects: 12 training scans, 4 validation, 4 test)
   — or uses ``--data DIR``;
2. trains the ``fast_cpu`` preset (``patch_flow``: block matching of full-resolution patches refined
   by a small CNN and fitted as a rigid in-plane motion, a few minutes; ``train.py``), with the
   untrained network as the first point of the validation curves and per-DOF errors against no
   motion's (``curves.png``);
3. runs ``generate_DDF.py`` with the last checkpoint on the test fold (4 scans of 2 subjects never
   trained on): every frame's transform, GPE/GLE/LPE/LLE, normalised scores, runtime, trajectory and
   drift plots;
4. does the same on the real tracked PLUS scans in ``../shared/realdata`` when they are there (no
   landmarks: landmark metrics are reported as absent), to show nothing is tied to 480x640 or to
   the simulator (the network was trained on simulated forearms at another pixel size).

Everything lands in a new ``results/<NNN>-demo/``: ``data/`` (the simulated set), ``000-train/``
(the training run), ``generate-test/`` and ``generate-realdata/`` (scores, summaries, plots).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

import pandas as pd

import generate_DDF
import train
from simulation.dataset import generate_dataset
from utils.challenge_data import CALIB_FILE
from utils.cli import run_cli
from utils.run_dir import make_run_dir

log = logging.getLogger("demo")

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_REALDATA = REPO_ROOT.parent / "shared" / "realdata"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results", help="root of the run folders")
    parser.add_argument("--data", type=Path, default=None,
                        help="train and score on this dataset root (either layout) instead of simulating one")
    parser.add_argument("--subjects", type=int, default=10,
                        help="simulated subjects (2 scans each; >= 5 for 5 folds; 10 gives 2 test subjects)")
    parser.add_argument("--frames", type=int, default=200, help="frames per simulated scan (20 fps)")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--workers", type=int, default=2, help="simulator render processes")
    parser.add_argument("--realdata", type=Path, default=DEFAULT_REALDATA,
                        help="folder of real dataset roots to score as well (skipped if absent)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="fast_cpu", help="training preset")
    parser.add_argument("--train_args", nargs=argparse.REMAINDER, default=[],
                        help="further train.py flags, e.g. --train_args --NUM_EPOCHS 2 (must come last)")
    return parser


def validation_curve(run_dir: Path) -> pd.DataFrame:
    """Per epoch: the loss, the point distance, whole-scan GPE/LPE, and each in-plane DOF's validation
    error as a fraction of no motion's (1 = not learned; the out-of-plane DOFs stay at 1 by design)."""
    table = pd.read_csv(run_dir / "metrics.csv")
    curve = table[["epoch", "step", "train_loss", "val_loss", "val_dist", "val_GPE", "val_LPE"]].copy()
    for dof in ("rz", "tx", "ty"):
        if f"val_{dof}" in table:
            curve[f"{dof}/none"] = table[f"val_{dof}"] / table[f"val_{dof}_identity"]
    return curve


def main(argv=None) -> Path:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out_dir = make_run_dir(args.out, "demo")
    log.info("demo folder: %s", out_dir)

    if args.data is None:
        data_root = out_dir / "data"
        log.info("1/4 simulating %d subjects x 2 scans x %d frames of %dx%d into %s",
                 args.subjects, args.frames, args.height, args.width, data_root)
        generate_dataset(data_root, "demo", seed=args.seed, workers=args.workers, progress=True,
                         subjects=args.subjects, frames=args.frames, height=args.height, width=args.width)
    else:
        data_root = args.data

    log.info("2/4 training (preset %s)", args.preset)
    result = train.run(["--preset", args.preset, "--DATA_PATH", str(data_root), "--out_dir", str(out_dir),
                        "--name", "train", "--cache_dir", str(out_dir / "cache"), "--seed", str(args.seed),
                        *args.train_args])
    # The last weights, not best.pt: best.pt is chosen by the point distance of all 6 DOFs, which the
    # in-plane model cannot lower much (the out-of-plane motion dominates it).
    checkpoint = result.run_dir / "last.pt"

    log.info("3/4 predicting and scoring the test fold with %s", checkpoint)
    test_dir, _ = generate_DDF.main(["--ckpt", str(checkpoint), "--split", "test", "--plots",
                                     "--out", str(out_dir / "generate-test")])
    real_dirs = []
    if args.realdata.is_dir():
        for root in sorted(p for p in args.realdata.iterdir() if (p / CALIB_FILE).is_file()):
            log.info("4/4 the real PLUS scans: %s", root.name)
            real_dir, _ = generate_DDF.main(["--ckpt", str(checkpoint), "--data_path", str(root), "--split", "all",
                                             "--plots", "--out", str(out_dir / f"generate-realdata-{root.name}")])
            real_dirs.append(real_dir)
    else:
        log.info("4/4 no real data at %s: skipped", args.realdata)

    curve = validation_curve(result.run_dir)
    with pd.option_context("display.width", 160, "display.float_format", "{:.4g}".format):
        print("\nValidation during training (mm; <dof>/none = error / no motion's; epoch 0 = the untrained network):")
        print(curve.to_string(index=False))
    first, last = curve["val_loss"].iloc[0], curve["val_loss"].iloc[-1]
    if math.isfinite(first):
        print(f"validation loss: untrained {first:.4f}, last {last:.4f} ({last / first:.2f} of the untrained's)")
    print(f"\nTraining run: {result.run_dir} (curves.png, metrics.csv, log.txt, last.pt, best.pt)")
    print(f"Test-fold scores and plots: {test_dir} (scores.csv, summary.csv, metrics.h5, plots/)")
    for real_dir in real_dirs:
        print(f"Real PLUS scans: {real_dir}")
    return out_dir


if __name__ == "__main__":
    sys.exit(run_cli(main))

"""What knowing the out-of-plane direction would be worth on a dataset: the TUS-REC errors of the true
motion with its out-of-plane direction changed as a model's would be.

Usage::

    python oop_headroom.py --data_path data/sim2025_test
    python oop_headroom.py --data_path data/sim2025_test --sign_accuracy 0.6 0.8 0.9 --block 1 50

Every variant keeps each pair's true in-plane motion (a_Z, t_x, t_y) and the true size of its
out-of-plane motion (a_Y, a_X, t_z); only the direction changes. Reversing a pair's out-of-plane
parameters mirrors its transform through the image plane (``M T M`` with ``M = diag(1, 1, -1, 1)``):

- ``in-plane only``: out-of-plane motion 0, the best a model that does not predict it can reach;
- ``mirrored``: every pair's out-of-plane motion reversed;
- ``a coin per scan (expected)``: not a draw but the mean of the true motion and ``mirrored``, half the
  errors of ``mirrored``. Where a scan has a mirror twin, another scan as likely, whose frames are the
  same and whose out-of-plane motion is reversed (the simulator's scans that start in a longitudinal
  plane: README, "Direction cues"), every image-only method predicts the same for both, and its errors
  on the two add up to at least ``mirrored``'s (the triangle inequality, point by point): this is the
  least it can expect there, and a method right in everything but the scan's overall direction reaches it;
- ``sign p, blocks of B``: each run of B consecutive pairs given the right direction with
  probability p, independently (B = 1: scattered mistakes, which partly cancel; larger B: mistakes
  that last, as a model's do over a half-swing);
- ``shrunk p, blocks of B``: the same directions, the size scaled by ``2p - 1``: the mean over both
  directions that a model sure to p of its direction predicts under a squared loss (``--loss
  l1_oop_mse``), which keeps its mistakes small;
- ``sign p, per move`` (and ``shrunk p, per move``): one draw per move, each move given the right
  direction with probability p, its turns kept: what a model would do that tells where a move starts
  and ends and where it turns, and only guesses which way the move as a whole went. A fan swings back
  to where it started, so a whole fan mirrored leaves no error after it; a quarter turn does not
  return, so its mistake lasts. Moves are found in the true motion (``utils.moves.move_segments``):
  stretches of out-of-plane turning, joined across stillness shorter than a pause; each stretch
  between moves (a pause, a rock, which turns the plane within itself, the hand's drift) is a
  segment of its own with one draw.

It answers how good a direction must be to reach a GPE target (issue 12), before a model is
trained. Needs no checkpoint; the draws are seeded (``--seed``), so a run repeats exactly.

Output (``--out``, default ``results/headroom-<dataset>``; files replaced)::

    scores.csv    one row per scan and variant: GPE, GLE, LPE, LLE (mm), segments (moves and the stretches between)
    summary.csv   per variant the mean over scans, and GPE over in-plane only's
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from utils import transform as tf
from utils.calibration import load_calibration
from utils.challenge_data import CALIB_FILE, ScanFile, check_scans, find_scans, read_landmarks
from utils.cli import run_cli
from utils.errors import InputError
from utils.evaluation import score_transforms, true_transforms
from utils.metrics import write_csv
from utils.moves import move_segments
from utils.training_data import resolve_data_root

log = logging.getLogger("oop_headroom")
ERRORS = ("GPE", "GLE", "LPE", "LLE")
COIN_PER_SCAN = "a coin per scan (expected)"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", type=Path, required=True, help="dataset root (either challenge layout)")
    parser.add_argument("--sign_accuracy", type=float, nargs="+", default=[0.6, 0.8, 0.9],
                        help="probabilities p of the right direction to try (each in 0.5..1)")
    parser.add_argument("--block", type=int, nargs="+", default=[1, 50],
                        help="consecutive pairs that share one draw of the direction (each >= 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the direction draws")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default results/headroom-<dataset>)")
    return parser


def check_arguments(args) -> None:
    bad = [p for p in args.sign_accuracy if not 0.5 <= p <= 1]
    if bad:
        raise InputError(f"--sign_accuracy {bad}: expected probabilities in 0.5..1 (below 0.5 is a mirrored model)")
    if any(b < 1 for b in args.block):
        raise InputError(f"--block {args.block}: expected whole numbers of pairs >= 1")


def direction_draws(num_pairs: int, accuracy: float, block: int, rng: np.random.Generator) -> torch.Tensor:
    """[num_pairs] float64: +1 where a pair's direction is right, -1 where reversed; one draw per
    ``block`` consecutive pairs, right with probability ``accuracy``."""
    return segment_draws(np.arange(num_pairs) // block, accuracy, rng)


def segment_draws(segments: np.ndarray, accuracy: float, rng: np.random.Generator) -> torch.Tensor:
    """[N] float64: +1 where a pair's direction is right, -1 where reversed; one draw per segment
    (``segments`` as ``move_segments`` numbers them), right with probability ``accuracy``."""
    right = rng.random(int(segments.max()) + 1) < accuracy
    return torch.from_numpy(np.where(right, 1.0, -1.0)[segments])


def with_out_of_plane_scaled(local: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Local transforms [N, 4, 4] with each pair's out-of-plane parameters (a_Y, a_X, t_z) multiplied by
    ``factor`` [N] (-1 mirrors the pair through the image plane, 0 keeps its in-plane motion only)."""
    params = tf.matrix_to_params(local)
    params[:, list(tf.OUT_OF_PLANE_DOFS)] *= factor[:, None]
    return tf.params_to_matrix(params)


def variants(segments: np.ndarray, accuracies, blocks, rng: np.random.Generator,
             move_rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """Name -> out-of-plane factor per pair, in the order of the table; ``segments`` from ``move_segments``;
    the per-move draws come from ``move_rng``, so the others are those of a run without them."""
    num_pairs = len(segments)
    factors = {"in-plane only": torch.zeros(num_pairs, dtype=torch.float64),
               "mirrored": -torch.ones(num_pairs, dtype=torch.float64)}
    for block in blocks:
        for accuracy in accuracies:
            signs = direction_draws(num_pairs, accuracy, block, rng)
            factors[f"sign {accuracy:g}, blocks of {block}"] = signs
            factors[f"shrunk {accuracy:g}, blocks of {block}"] = (2 * accuracy - 1) * signs
    for accuracy in accuracies:
        signs = segment_draws(segments, accuracy, move_rng)
        factors[f"sign {accuracy:g}, per move"] = signs
        factors[f"shrunk {accuracy:g}, per move"] = (2 * accuracy - 1) * signs
    return factors


def scan_rows(ref, calibration, accuracies, blocks, rng: np.random.Generator, move_rng: np.random.Generator) -> list[dict]:
    with ScanFile(ref) as scan_file:
        tforms = scan_file.read_tforms()
        num_frames, (height, width) = scan_file.num_frames, scan_file.frame_size
    landmarks = None
    if ref.landmark_path is not None:
        landmarks = read_landmarks(ref.landmark_path, ref.name, num_frames, height, width)
    global_true, local_true = true_transforms(tforms, calibration)
    scale = torch.as_tensor(np.array(calibration.scale), dtype=torch.float64)
    rows = []
    segments = move_segments(local_true)
    for name, factor in variants(segments, accuracies, blocks, rng, move_rng).items():
        local = with_out_of_plane_scaled(local_true, factor)
        errors = score_transforms(global_true, local_true, tf.chain_local_transforms(local), local, scale, landmarks,
                                  height, width)[0]
        rows.append({"subject": ref.subject, "scan": ref.name, "variant": name, **{k: errors[k] for k in ERRORS},
                     "segments": int(segments.max()) + 1})
        if name == "mirrored":
            rows.append({**rows[-1], "variant": COIN_PER_SCAN, **{k: errors[k] / 2 for k in ERRORS}})
    return rows


def summary_table(scores: pd.DataFrame) -> pd.DataFrame:
    """Mean of each error over the scans per variant (in the order first seen), and GPE over in-plane only's."""
    summary = scores.groupby("variant", sort=False)[list(ERRORS)].mean()
    summary["GPE_vs_in_plane_only"] = summary["GPE"] / summary.loc["in-plane only", "GPE"]
    return summary


def main(argv=None) -> tuple[Path, pd.DataFrame]:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    check_arguments(args)
    data_root = resolve_data_root(args.data_path)
    calibration = load_calibration(data_root / CALIB_FILE)
    refs = find_scans(data_root)
    check_scans(refs)  # a damaged or short scan fails now, before minutes of work on the others
    out_dir = args.out if args.out is not None else Path("results") / f"headroom-{data_root.resolve().name}"
    rng, move_rng = np.random.default_rng(args.seed), np.random.default_rng([args.seed, 1])
    rows = []
    for ref in tqdm(refs, desc="scans", unit="scan", disable=not sys.stderr.isatty()):
        rows.extend(scan_rows(ref, calibration, args.sign_accuracy, args.block, rng, move_rng))
    scores = pd.DataFrame(rows)
    summary = summary_table(scores)
    write_csv(scores, out_dir / "scores.csv")
    write_csv(summary, out_dir / "summary.csv", index=True)
    log.info("%d scans of %s, true in-plane motion and out-of-plane sizes, mean errors (mm):\n%s\n-> %s",
             len(refs), data_root, summary.round(3).to_string(), out_dir)
    return out_dir, summary


if __name__ == "__main__":
    sys.exit(run_cli(main))

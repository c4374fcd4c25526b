"""Learning works: a short training run beats "no motion" on a subject it never saw (issue 11).

The guard against any later change that silently stops learning (a broken label, a sign flipped in
the geometry, a loss that no longer reaches the network, a data pipeline that scrambles pairs):
simulated forearm scans at the real frame size, the demo's preset for a few dozen steps, then the
held-out test subject scored by generate_DDF.py exactly as a user would. Deterministic: fixed seeds,
no loader workers.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd
import pytest

import generate_DDF
import train
from simulation.dataset import generate_dataset

# Stated margins (the run is deterministic; the margins leave room for numerical differences across
# platforms, not for a model that stops learning). Measured with the current fast_cpu design (speckle
# patch selection, +-12 px, 3 robust passes, L1 loss), whose untrained block matching is already within
# a few hundredths of a millimetre of the true in-plane motion: LPE 0.90 and 0.75 of no motion's on
# the two held-out scans; training loss 0.0753 -> 0.0652 from the first to the last epoch (0.87; on
# issue 12's machine 0.0753 -> 0.0687, 0.91, with 2 threads, and below 0.90 with 1: the order of
# floating-point sums changes the trajectory; the same run with a learning rate of 1e-9, i.e. weights
# that do not change: 0.0762 -> 0.0770, 1.01);
# best validation loss 0.98 of the untrained network's (1.00 for the frozen run). At this scale (3
# training subjects, 108 steps, 32 validation pairs) the refinement cannot show more than that on
# validation; `make demo` (240 steps, validation loss 0.38 of the untrained's) and cpu_hour (0.62) do.
# - the held-out subject's local pixel error at most 95 % of no motion's, and every one of GPE, GLE,
#   LPE, LLE below no motion's;
# - the training loss of the last epoch at most 95 % of the first's (a network whose weights stop
#   changing stays at ~100 %, one trained on scrambled labels does not fall);
# - the best validation loss below the untrained network's (a network that never changes is equal,
#   one that training only harms is above).
LPE_RATIO_MAX = 0.95
TRAIN_LOSS_RATIO_MAX = 0.95
VAL_LOSS_RATIO_MAX = 1.0


@pytest.fixture(scope="module")
def held_out_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("learning")
    data = root / "data"
    # 5 subjects -> 5 folds of one: 3 train, 1 validation, 1 test (the baseline's split).
    generate_dataset(data, "demo", seed=11, subjects=5, frames=100)
    result = train.run(["--preset", "fast_cpu", "--DATA_PATH", str(data), "--out_dir", str(root / "runs"),
                        "--name", "learning", "--device", "cpu", "--num_workers", "0", "--seed", "0",
                        "--MINIBATCH_SIZE", "16", "--samples_per_scan", "96", "--num_epochs", "3",
                        "--val_samples_per_scan", "16", "--val_scan_every", "0", "--warmup_steps", "5"])
    out_dir, _ = generate_DDF.main(["--ckpt", str(result.run_dir / "last.pt"), "--split", "test",
                                    "--out", str(root / "generate-test")])
    return result.run_dir, Path(out_dir)


@pytest.mark.slow
def test_training_beats_no_motion_on_a_held_out_subject(held_out_run):
    _, out_dir = held_out_run
    scores = pd.read_csv(out_dir / "scores.csv")
    assert len(scores) == 2  # the test subject's two rotation scans
    for name in ("GPE", "GLE", "LPE", "LLE"):
        assert (scores[name] < scores[f"{name}_identity"]).all(), scores[[name, f"{name}_identity"]]
    assert (scores["LPE"] <= LPE_RATIO_MAX * scores["LPE_identity"]).all()
    assert (scores["final"] > 0).all()


@pytest.mark.slow
def test_training_improves_on_the_untrained_network(held_out_run):
    run_dir, _ = held_out_run
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    train_losses = [float(row["train_loss"]) for row in rows[1:]]
    assert train_losses[-1] <= TRAIN_LOSS_RATIO_MAX * train_losses[0], train_losses
    untrained = float(rows[0]["val_loss"])
    best = min(float(row["val_loss"]) for row in rows[1:])
    assert best < VAL_LOSS_RATIO_MAX * untrained, (untrained, best)
    # the in-plane DOFs are predicted, the out-of-plane ones left at no motion by design
    for dof in ("rz", "tx", "ty"):
        assert float(rows[-1][f"val_{dof}"]) < float(rows[-1][f"val_{dof}_identity"])
    for dof in ("ry", "rx", "tz"):
        assert float(rows[-1][f"val_{dof}"]) == pytest.approx(float(rows[-1][f"val_{dof}_identity"]))

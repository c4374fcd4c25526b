"""End to end: the demo simulates a dataset, trains, predicts and scores the test fold and the real scans."""

import math

import pandas as pd
import pytest

import demo


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, realdata_dir):
    run = demo.main(["--out", str(tmp_path), "--subjects", "5", "--frames", "24", "--height", "120",
                     "--width", "160", "--realdata", str(realdata_dir),
                     "--train_args", "--NUM_EPOCHS", "2", "--samples_per_scan", "2", "--val_scan_every", "1",
                     "--num_workers", "0"])
    assert run.name == "000-demo"
    train_dir = run / "000-train"
    for name in ("curves.png", "metrics.csv", "log.txt", "last.pt", "best.pt", "options.yaml", "folds.json"):
        assert (train_dir / name).is_file(), name
    curve = pd.read_csv(train_dir / "metrics.csv")
    assert list(curve["epoch"]) == [0, 1, 2] and curve["val_dist"].notna().all()

    # 5 subjects in 5 folds: the test fold is one subject, both of its scans
    scores = pd.read_csv(run / "generate-test" / "scores.csv", dtype={"subject": str})
    assert len(scores) == 2 and scores["subject"].nunique() == 1
    assert scores[["GPE", "GLE", "LPE", "LLE", "final"]].notna().all().all()
    # the identity init starts from "no motion": a network trained for two tiny epochs stays near it,
    # and a normalised score can be negative, but never above 1
    assert (scores["final"] <= 1).all()
    plots = sorted(p.name for p in (run / "generate-test" / "plots").iterdir())
    assert len(plots) == 4 and all(p.endswith(".png") for p in plots)

    for name in ("plus_bone_l14", "plus_spine_phantom"):
        real = pd.read_csv(run / f"generate-realdata-{name}" / "scores.csv")
        assert len(real) == 1
        assert real["GLE"].isna().all() and real["final"].isna().all()  # no landmarks: absent, not zero
        assert math.isfinite(real["GPE"].iloc[0]) and math.isfinite(real["pixel"].iloc[0])
    assert not list(run.rglob("*.partial*"))  # nothing half-written left behind

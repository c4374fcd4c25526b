"""End to end: the demo writes a dataset, reads it back, scores it two ways, writes tables and plots."""

import math

import pandas as pd
import pytest

import demo


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, realdata_dir):
    run = demo.main(["--out", str(tmp_path), "--subjects", "1", "--frames", "40", "--height", "120",
                     "--width", "160", "--landmarks", "10", "--realdata", str(realdata_dir)])
    assert run.name == "000-demo"
    table = pd.read_csv(run / "scores.csv", dtype={"subject": str})
    assert list(table["dataset"]) == ["synthetic", "synthetic", "plus_bone_l14", "plus_spine_phantom"]
    synthetic = table[table["dataset"] == "synthetic"]
    # a biased, noisy prediction: better than predicting no motion, worse than perfect
    assert ((synthetic["final"] > 0) & (synthetic["final"] < 1)).all()
    assert (synthetic["GPE"] > synthetic["LPE"]).all()  # chained errors accumulate
    real = table[table["dataset"] != "synthetic"]
    assert real["GLE"].isna().all() and real["final"].isna().all() and real["pixel"].notna().all()
    # the first scan of each dataset was also scored from DDF files streamed to disk
    checked = table.dropna(subset=["GPE_from_ddfs"])
    assert len(checked) == 3
    assert ((checked["GPE"] - checked["GPE_from_ddfs"]).abs() < 1e-4).all()
    summary = pd.read_csv(run / "summary.csv", index_col=0)
    assert math.isclose(summary.loc["synthetic", "GPE_mean"], synthetic["GPE"].mean(), rel_tol=1e-9)
    plots = sorted(p.name for p in (run / "plots").iterdir())
    assert len(plots) == 8 and all(p.endswith(".png") for p in plots)
    assert not list(run.rglob("*.partial*"))  # nothing half-written left behind
    # a second run goes to a new folder and leaves the first untouched
    assert demo.main(["--out", str(tmp_path), "--subjects", "1", "--frames", "3", "--height", "48", "--width", "64",
                      "--landmarks", "2", "--realdata", str(tmp_path / "none")]).name == "001-demo"
    assert (run / "scores.csv").is_file()

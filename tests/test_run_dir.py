"""Run folders are numbered and never reused."""

import pytest

from utils.run_dir import make_run_dir


def test_run_dirs_are_numbered_and_distinct(tmp_path):
    first = make_run_dir(tmp_path, "demo")
    second = make_run_dir(tmp_path, "demo")
    other = make_run_dir(tmp_path, "train")
    assert [p.name for p in (first, second, other)] == ["000-demo", "001-demo", "002-train"]
    (tmp_path / "017-old").mkdir()
    assert make_run_dir(tmp_path, "demo").name == "018-demo"


def test_run_name_must_not_escape_the_root(tmp_path):
    with pytest.raises(ValueError, match="run name '../x'"):
        make_run_dir(tmp_path, "../x")

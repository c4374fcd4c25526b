"""Run folders are numbered and never reused; atomic writes leave normal files."""

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


def test_atomic_files_get_the_usual_permissions(tmp_path):
    import os
    import stat

    from utils.atomic import atomic_path

    with atomic_path(tmp_path / "out.txt") as tmp:
        tmp.write_text("x")
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "out.txt").stat().st_mode) == 0o666 & ~mask

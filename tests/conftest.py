"""Shared fixtures: the tests directory on sys.path (for `reference`) and the real PLUS scans."""

import os
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
sys.path.insert(0, str(TESTS_DIR))
sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope="session")
def realdata_dir() -> Path:
    """../shared/realdata beside the checkout (CI puts shared/ there), or $TUSREC_REALDATA."""
    path = Path(os.environ.get("TUSREC_REALDATA", REPO_ROOT.parent / "shared" / "realdata"))
    if not path.is_dir():
        pytest.skip(f"real PLUS scans not found at {path} (set TUSREC_REALDATA)")
    return path

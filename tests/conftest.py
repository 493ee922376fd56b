"""Fixtures shared by every test folder."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


# CI has ../shared/data and sets this, so a real-data test fails there instead of skipping unseen.
REQUIRE_SHARED_DATA = "FEDMED_REQUIRE_SHARED_DATA"


def _real_data_missing(reason: str) -> None:
    if os.environ.get(REQUIRE_SHARED_DATA) == "1":
        pytest.fail(f"{reason} ({REQUIRE_SHARED_DATA}=1 makes this a failure, not a skip)")
    pytest.skip(f"{reason}; set FEDMED_SHARED_DATA to the shared data folder to run this test")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Real data sets beside the checkout (../shared/data); tests that need them skip when it is absent."""
    path = Path(os.environ.get("FEDMED_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not path.is_dir():
        _real_data_missing(f"real data not found at {path}")
    return path


@pytest.fixture(scope="session")
def shared_dataset(shared_data: Path) -> Callable[[str], Path]:
    """One data set (or file) inside the shared data folder, skipped or failed like `shared_data` when absent."""

    def find(relative: str) -> Path:
        path = shared_data / relative
        if not path.exists():
            _real_data_missing(f"{path} absent")
        return path

    return find

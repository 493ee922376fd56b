"""Fixtures shared by every test folder."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from browser import CHROMIUM, CONSOLE_LINE, run_chromium

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


def pytest_configure(config: pytest.Config) -> None:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        # pytest-xdist workers share the machine's cores: more torch threads per worker than that only thrash, and
        # the processes a test starts (fedmed demo, Ray actors) inherit the cap through OMP_NUM_THREADS. Measured:
        # the demo test took 600 s instead of 70 s beside a busy worker with OpenMP's default of every core.
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


# Test kinds, from the folder a test lives in. A test in a unit folder that runs a whole federation says so with
# @pytest.mark.federation, as does one in a real browser. `pytest -m unit` is the fast loop; the others need
# processes or minutes.
INTEGRATION_FOLDERS = {"deploy": "deploy", "federation": "federation", "realdata": "federation"}
KINDS = ("unit", "federation", "deploy")
BROWSER_FIXTURE = "chromium"  # a real headless browser takes seconds per page: not the fast loop


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        folder = Path(item.path).relative_to(REPO_ROOT / "tests").parts[0]
        kind = INTEGRATION_FOLDERS.get(folder)
        if kind is None and not any(item.get_closest_marker(name) for name in KINDS):
            heavy = item.get_closest_marker("slow") or BROWSER_FIXTURE in getattr(item, "fixturenames", ())
            kind = "federation" if heavy else "unit"
        if kind is not None and not item.get_closest_marker(kind):
            item.add_marker(getattr(pytest.mark, kind))


# A real headless browser (Debian Chromium), for pages a person opens offline ------------------------------
BrowserDom = Callable[[Path, Path], tuple[str, list[str]]]


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Chromium's path; skipped when absent, failed instead where FEDMED_REQUIRE_CHROMIUM=1 (CI)."""
    if not CHROMIUM.exists():
        reason = f"Debian Chromium not found at {CHROMIUM}; install it with `apt-get install chromium`"
        if os.environ.get("FEDMED_REQUIRE_CHROMIUM") == "1":
            pytest.fail(f"{reason} (FEDMED_REQUIRE_CHROMIUM=1 makes this a failure, not a skip)")
        pytest.skip(f"{reason}, or set FEDMED_REQUIRE_CHROMIUM=1 to fail instead of skipping")
    return CHROMIUM


@pytest.fixture
def browser_dom(chromium: Path) -> BrowserDom:
    """`dom, console = browser_dom(page, scratch)`: the page's DOM after its scripts ran, and its console lines."""

    def dump(page: Path, scratch: Path) -> tuple[str, list[str]]:
        stdout, stderr = run_chromium(chromium, page, extra=["--dump-dom"], scratch=scratch)
        return stdout, CONSOLE_LINE.findall(stderr)

    return dump


@pytest.fixture
def server_task() -> Iterator[None]:
    """Messages take their run and sender from the process's task identity, as in a ServerApp."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved

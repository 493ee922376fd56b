from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import Federation, descendants


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """Coordinator and three sites, provisioned with TLS and node keys, serving until the module ends."""
    federation = Federation(tmp_path_factory.mktemp("federation"))
    federation.provision()
    federation.start_server()
    federation.wait_for_server()
    for site in federation.sites:
        federation.start_site(site)
    try:
        federation.wait_for_sites(set(federation.sites))
        yield federation
    finally:
        pids = [pid for daemon in federation.daemons.values() for pid in [daemon.pid, *descendants(daemon.pid)]]
        federation.close()
        left = [pid for pid in pids if Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)]
        assert not left, f"processes left running: {left}"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"

"""A site the coordinator removes is told once, backs off, and stops (exit code 2) after its bound,
instead of polling the coordinator's proxy for 403s forever. Its own small federation: the site
does not come back, and the session's shared federation keeps its three sites."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_helpers import close_leaving_nothing, one_site_data, require_nginx

from fedmed.config import load_server_config
from fedmed.deploy.local import FEDMED, LocalFederation, cli
from fedmed.deploy.proxy import proxy_dir

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BOUND_S = 20.0  # daemon.revoked_exit_after_s for this test: retries every 5 s (its tenth, at least 5 s)
SAID = "the coordinator refuses this site's certificate"


@pytest.fixture(scope="module")
def lone_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    require_nginx()
    root = tmp_path_factory.mktemp("revoked")
    federation = LocalFederation(root, site_data={"a": one_site_data(root / "data")}, federation="lone")
    federation.provision()
    federation.edit_site("a", daemon={"revoked_exit_after_s": BOUND_S})
    try:
        federation.start()
        yield federation
    finally:
        close_leaving_nothing(federation)


def _forbidden(access_log: Path, *, after: int) -> int:
    return sum(" 403 " in line for line in access_log.read_text()[after:].splitlines())


def test_a_removed_site_is_told_once_and_stops_within_its_bound(lone_site: LocalFederation) -> None:
    access_log = proxy_dir(load_server_config(lone_site.server_config)) / "access.log"
    before = len(access_log.read_text())
    daemon = lone_site.daemons["a"]
    out = lone_site.root / "site-a.out"

    # Timed from before the removal: the daemon can meet its first refusal, and start its bound, before the
    # command has returned.
    removed = time.monotonic()
    cli([FEDMED, "server", "remove-site", str(lone_site.server_config), "a"])
    # Without a bound the daemon polls on for good (the issue counted 3,458 refused requests in 15 min).
    code = daemon.wait(timeout=BOUND_S + 90)
    took = time.monotonic() - removed

    said = out.read_text()
    assert code == 2, said[-3000:]
    # Said once when first seen (however many retries follow), and once more as the reason for stopping.
    assert said.count(f"{SAID}") == 2 and said.count("retrying every 5 s, giving up after 20 s") == 1, said
    assert "fedmed server remove-site" in said and "still refused after" in said
    assert BOUND_S <= took <= BOUND_S + 60, took
    refused = _forbidden(access_log, after=before)
    # A few requests per slow retry (every 5 s) instead of ~4 a second: about 100 in this time without backing off.
    assert 1 <= refused <= 40, refused

"""The coordinator's view of uploads through the proxy in one exchange: a site's upload counts as stalled only after
the deadline and once no request of it has completed for upload_stall_s; the reason names the bytes left."""

from __future__ import annotations

import time
from pathlib import Path

from fedmed.flower.server.deployed_replies import UploadWatch
from fedmed.runs.proxy_traffic import ProxyLog


def _push(log: Path, site: str, size: int) -> None:
    with log.open("a") as handle:
        handle.write(
            f'2026-12-07T20:00:00+00:00 127.0.0.1 "{site}" "CN={site}" {"ab" * 20} '
            f'"POST /v1/fleet/push-object HTTP/1.1" 200 {size} 120 0.5\n'
        )


def test_a_stall_is_declared_after_the_deadline_and_named_with_the_bytes_left(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    _push(log, "a", 999)  # before the exchange: not counted
    before = UploadWatch(ProxyLog(log), deadline=time.monotonic() + 60, timeout=60, stall_s=0.2)
    assert not before.stalled("b"), "before the deadline nothing is stalled"

    watch = UploadWatch(ProxyLog(log), deadline=time.monotonic() - 1, timeout=8, stall_s=0.2)
    watch.CHECK_EVERY_S = 0.0
    _push(log, "a", 1_500_000)
    watch.arrived("a")
    _push(log, "b", 400_000)
    assert not watch.stalled("b"), "the first look only notes where its upload stands"
    time.sleep(0.1)
    _push(log, "b", 100_000)
    assert not watch.stalled("b"), "bytes arrived since: progress"
    time.sleep(0.25)
    assert watch.stalled("b")
    assert watch.unfinished("b") == (
        "its reply's upload did not finish after the round timeout (8 s): 500.0 kB had crossed the proxy, about "
        "1.0 MB were left (site a's reply: 1.5 MB), and none of it arrived for 0.2 s (strategy.upload_stall_s)"
    )
    assert watch.missing("c") == "no reply before the round timeout (8 s); it sent none"
    assert (
        UploadWatch(None, deadline=0, timeout=8, stall_s=0.2).missing("c") == "no reply before the round timeout (8 s)"
    )


def test_the_bytes_left_are_told_before_any_other_reply_was_taken(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.touch()
    watch = UploadWatch(ProxyLog(log), deadline=time.monotonic() - 1, timeout=8, stall_s=0.2)
    watch.CHECK_EVERY_S = 0.0
    _push(log, "a", 1_500_000)  # site a's reply has crossed the proxy; the coordinator has not taken it yet
    _push(log, "b", 500_000)
    assert "500.0 kB had crossed the proxy, about 1.0 MB were left (site a's reply: 1.5 MB)" in watch.unfinished("b")

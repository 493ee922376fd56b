"""Each site's bytes, summed from the front proxy's access log in the format fedmed.deploy.proxy writes."""

from __future__ import annotations

from pathlib import Path

from fedmed.runs.proxy_traffic import ProxyLog

FINGERPRINT = "3f" * 20
LINES = [
    # site, DN, request, status, request length, bytes sent
    ("a", "CN=a", "POST /v1/fleet/pull-messages HTTP/1.1", 200, 420, 1_500_000),
    ("a", "CN=a", "POST /v1/fleet/push-messages HTTP/1.1", 200, 900, 300),
    ("a", "CN=a", "POST /v1/fleet/push-object HTTP/1.1", 200, 1_400_000, 200),
    ("b", "CN=b", "POST /v1/fleet/send-node-heartbeat HTTP/1.1", 200, 250, 180),
    ("b", "CN=b", "POST /v1/fleet/push-object HTTP/1.1", 413, 9_000_000, 500),  # refused: not an upload
    ("", "-", "POST /v1/fleet/push-object HTTP/1.1", 403, 5_000, 150),  # an outsider: no site's traffic
]


def _line(site: str, dn: str, request: str, status: int, received: int, sent: int) -> str:
    head = f'2026-12-07T20:00:00+00:00 127.0.0.1 "{site}" "{dn}" {FINGERPRINT}'
    return f'{head} "{request}" {status} {received} {sent} 0.012\n'


def test_requests_are_summed_per_site_and_only_accepted_pushes_count_as_uploads(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_text("".join(_line(*fields) for fields in LINES))
    traffic = ProxyLog(log).since(0)
    assert set(traffic) == {"a", "b"}
    assert traffic["a"].as_record() == {"from_site": 1_401_320, "to_site": 1_500_500, "replies": 1_400_900}
    assert traffic["b"].as_record() == {"from_site": 9_000_250, "to_site": 680, "replies": 0}


def test_counting_starts_at_the_offset_and_skips_a_line_still_being_written(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_text(_line(*LINES[0]))
    proxy = ProxyLog(log)
    offset = proxy.end()
    with log.open("a") as handle:
        handle.write(_line(*LINES[3]) + _line(*LINES[2])[:40])
    assert proxy.record(offset) == {"proxy_bytes": {"b": {"from_site": 250, "to_site": 180, "replies": 0}}}
    assert ProxyLog(tmp_path / "absent.log").since(0) == {} and ProxyLog(tmp_path / "absent.log").end() == 0

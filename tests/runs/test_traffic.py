"""The bytes each site was sent and sent back, as the report and `fedmed status` show them from rounds.jsonl."""

from __future__ import annotations

from fedmed.runs.traffic import format_bytes, round_traffic_line, site_totals, traffic_section

ROUNDS = [
    {"round": 1, "upload_bytes": {"a": 1_000, "b": 2_000}, "download_bytes": {"a": 4_000, "b": 4_000}},
    {"round": 2, "upload_bytes": {"a": 3_000}, "download_bytes": {"a": 4_000, "b": 4_000}},  # b dropped
    {"round": 3},  # a run from before byte counts
]


def test_each_site_is_summed_over_the_rounds_it_took_part_in() -> None:
    assert site_totals(ROUNDS) == {
        "a": {"upload": 4_000, "download": 8_000, "rounds": 2},
        "b": {"upload": 2_000, "download": 8_000, "rounds": 1},
    }


def test_status_and_report_read_them() -> None:
    assert round_traffic_line(ROUNDS[0]) == "sent 4.0 kB, received 2.0 kB per site"
    assert round_traffic_line(ROUNDS[2]) is None
    section = traffic_section(ROUNDS)
    assert "<td>a</td><td>2</td><td>2.0 kB</td><td>4.0 kB</td><td>0.500</td>" in section
    assert "predates byte counts" in traffic_section(ROUNDS[2:])
    assert [format_bytes(n) for n in (999, 1_500, 217_409_816, 3e12)] == ["999 B", "1.5 kB", "217.4 MB", "3000.0 GB"]


def test_a_deployed_runs_proxy_counts_are_shown_beside_flowers() -> None:
    row = {
        "round": 1,
        "upload_bytes": {"a": 1_000},
        "download_bytes": {"a": 4_000},
        "proxy_bytes": {"a": {"from_site": 1_500, "to_site": 9_000, "replies": 1_100}},
    }
    assert round_traffic_line(row) == (
        "sent 4.0 kB, received 1.0 kB per site (at the proxy, polling included: sent 9.0 kB, received 1.5 kB)"
    )
    assert site_totals([row])["a"] == {
        "upload": 1_000,
        "download": 4_000,
        "rounds": 1,
        "proxy_upload": 1_500,
        "proxy_download": 9_000,
    }
    assert "<td>1.5 kB</td><td>9.0 kB</td></tr>" in traffic_section([row])
    assert "at the proxy" not in traffic_section(ROUNDS)

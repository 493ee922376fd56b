"""What crossed the wire in a run: each site's bytes per round, as rounds.jsonl records them (upload_bytes: its
replies as the coordinator received them; download_bytes: the messages it was sent; both as Flower serializes the
message content; in deployment also proxy_bytes, every request of the site's through the front proxy), for the
report and `fedmed status`."""

from __future__ import annotations

import html
from typing import Any


def format_bytes(count: float) -> str:
    if abs(count) < 1000:
        return f"{count:.0f} B"
    for unit in ("kB", "MB"):
        count /= 1000
        if abs(count) < 1000:
            return f"{count:.1f} {unit}"
    return f"{count / 1000:.1f} GB"


def round_traffic_line(row: dict[str, Any]) -> str | None:
    """'sent 190.2 kB, received 12.6 kB per site' for one round (the largest site's), or None if not recorded."""
    upload, download = row.get("upload_bytes") or {}, row.get("download_bytes") or {}
    if not upload and not download:
        return None
    line = (
        f"sent {format_bytes(max(download.values(), default=0))}, "
        f"received {format_bytes(max(upload.values(), default=0))} per site"
    )
    if proxy := row.get("proxy_bytes"):
        sent, received = (max(counts[key] for counts in proxy.values()) for key in ("to_site", "from_site"))
        line += f" (at the proxy, polling included: sent {format_bytes(sent)}, received {format_bytes(received)})"
    return line


def site_totals(rounds: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per site: bytes received from it and sent to it over the recorded rounds, and the rounds it took part in."""
    totals: dict[str, dict[str, int]] = {}
    for row in rounds:
        for field, direction in (("upload_bytes", "upload"), ("download_bytes", "download")):
            for site, count in (row.get(field) or {}).items():
                entry = totals.setdefault(site, {"upload": 0, "download": 0, "rounds": 0})
                entry[direction] += int(count)
        for site in row.get("upload_bytes") or {}:
            totals[site]["rounds"] += 1
        for site, counts in (row.get("proxy_bytes") or {}).items():
            entry = totals.setdefault(site, {"upload": 0, "download": 0, "rounds": 0})
            entry["proxy_upload"] = entry.get("proxy_upload", 0) + int(counts["from_site"])
            entry["proxy_download"] = entry.get("proxy_download", 0) + int(counts["to_site"])
    return dict(sorted(totals.items()))


def traffic_section(rounds: list[dict[str, Any]]) -> str:
    """The report's table of each site's bytes over the run's training rounds."""
    totals = site_totals(rounds)
    head = "<h2>Traffic</h2>\n"
    if not totals:
        return head + '<p class="muted">Not recorded for this run (its rounds.jsonl predates byte counts).</p>\n'
    proxy = any("proxy_upload" in entry for entry in totals.values())
    body = "".join(
        f"<tr><td>{html.escape(site)}</td><td>{entry['rounds']}</td>"
        f"<td>{format_bytes(entry['upload'] / max(entry['rounds'], 1))}</td>"
        f"<td>{format_bytes(entry['download'] / max(entry['rounds'], 1))}</td>"
        f"<td>{entry['upload'] / entry['download']:.3f}</td>"
        f"<td>{format_bytes(entry['upload'])}</td><td>{format_bytes(entry['download'])}</td>"
        + (
            f"<td>{format_bytes(entry.get('proxy_upload', 0))}</td>"
            f"<td>{format_bytes(entry.get('proxy_download', 0))}</td>"
            if proxy
            else ""
        )
        + "</tr>"
        if entry["download"]
        else ""
        for site, entry in totals.items()
    )
    return head + (
        '<p class="muted">Training rounds only: message contents as Flower serializes them, the site\'s update '
        "as it arrived (compressed with [compression]) and the global model as sent. Each site's audit log "
        "records the same count for each update it sent."
        + (
            " At the proxy: every request of the site's during the rounds as it crossed the coordinator's front "
            "proxy, HTTP headers, polling and heartbeats included."
            if proxy
            else ""
        )
        + "</p>\n<table><tr><th>site</th><th>rounds</th><th>received per round</th><th>sent per round</th>"
        "<th>received / sent</th><th>received in all</th><th>sent in all</th>"
        + ("<th>received at the proxy</th><th>sent at the proxy</th>" if proxy else "")
        + f"</tr>{body}</table>\n"
    )

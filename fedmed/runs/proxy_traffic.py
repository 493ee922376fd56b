"""What crossed the coordinator's front proxy, per site: nginx's access log, summed from a byte offset on.

The proxy (fedmed.deploy.proxy) writes one line per request with the enrolled site its client certificate
belongs to, the request's length and the bytes sent back: HTTP as it crossed the proxy once TLS was taken off,
headers included. A site's uploads are its push requests (its reply's message and objects); everything else
it sends is polling and heartbeats. nginx logs a request when it completes, so an upload in progress shows as
the objects it has finished.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOG_NAME = "access.log"
_LINE = re.compile(
    r'^\S+ \S+ "(?P<site>[^"]*)" "[^"]*" \S+ "(?P<request>[^"]*)" (?P<status>\d{3}) (?P<received>\d+) (?P<sent>\d+) '
)
_UPLOADS = ("/v1/fleet/push-messages", "/v1/fleet/push-object")


@dataclass
class SiteTraffic:
    received: int = 0  # bytes of the site's requests
    sent: int = 0  # bytes of the proxy's responses to it
    uploaded: int = 0  # of `received`, in accepted push requests: its replies

    def as_record(self) -> dict[str, int]:
        return {"from_site": self.received, "to_site": self.sent, "replies": self.uploaded}


class ProxyLog:
    """The front proxy's access log, read by the coordinator's ServerApp."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def end(self) -> int:
        """The log's current length: where a later `since` starts counting."""
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def since(self, offset: int) -> dict[str, SiteTraffic]:
        """Each enrolled site's traffic in the lines written after `offset` (whole lines only)."""
        return self.read(offset)[0]

    def read(self, offset: int, *, into: dict[str, SiteTraffic] | None = None) -> tuple[dict[str, SiteTraffic], int]:
        """The whole lines written after `offset`, added per site to `into` (a new tally by default); and the
        offset after the last of them, where the next read goes on."""
        traffic = {} if into is None else into
        try:
            with self.path.open("rb") as log:
                log.seek(offset)
                text = log.read()
        except FileNotFoundError:
            return traffic, offset
        whole = text[: text.rfind(b"\n") + 1]
        for line in whole.decode("utf-8", errors="replace").splitlines():
            match = _LINE.match(line)
            if match is None or not match["site"]:  # a refused outsider's request is no site's traffic
                continue
            counts = traffic.setdefault(match["site"], SiteTraffic())
            counts.received += int(match["received"])
            counts.sent += int(match["sent"])
            path = match["request"].split(" ")[1] if " " in match["request"] else ""
            if path in _UPLOADS and match["status"].startswith("2"):
                counts.uploaded += int(match["received"])
        return traffic, offset + len(whole)

    def record(self, offset: int) -> dict[str, Any]:
        """rounds.jsonl's `proxy_bytes`: per site, what crossed the proxy since `offset`."""
        return {"proxy_bytes": {site: counts.as_record() for site, counts in sorted(self.since(offset).items())}}

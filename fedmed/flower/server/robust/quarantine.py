"""Quarantine: a site flagged in `quarantine_after` of its last `quarantine_window` rounds is left out until a
person re-admits it.

Not only consecutive flags count: a site with broken labels can alternate (its flagged update is left out, so
the next global model sits where its update looks less unusual), and no honest scanner-drifted site was flagged at
all in the robustness benchmark (docs/benchmarks/robustness.md); an honest site of another population was
(docs/benchmarks/every-site.md), which is why a person decides. The book is the coordinator's memory across
rounds (each site's recent flags and their evidence, who is quarantined and why); it is saved in every checkpoint
so a resumed run keeps it, and only the coordinator's `fedmed run --resume RUN --readmit SITE` clears a site.
A re-admitted site is vouched for from then on (fedmed.flower.server.robust.diagnostics): its updates far from
the others but still pointing their way are kept, down-weighted, and not counted. Nothing is deleted: a
quarantined site's past rounds, metrics and evidence stay in the run directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedmed.core.log import logger

from .diagnostics import Contribution


@dataclass
class QuarantineBook:
    quarantine_after: int  # flags that quarantine a site; 0: never
    window: int  # ... within this many of its latest rounds
    recent: dict[str, list[bool]] = field(default_factory=dict)  # each site's latest rounds: flagged or not
    evidence: dict[str, list[str]] = field(default_factory=dict)  # the flagged rounds' evidence, by site
    quarantined: dict[str, dict[str, Any]] = field(default_factory=dict)  # site -> {"round", "evidence"}
    vouched: set[str] = field(default_factory=set)  # re-admitted by the coordinator

    def holds(self, site: str) -> bool:
        return site in self.quarantined

    def note_round(self, contributions: dict[str, Contribution], *, server_round: int) -> list[dict[str, Any]]:
        """Count this round's flags; the events of the sites quarantined by them."""
        events = []
        for site, contribution in sorted(contributions.items()):
            self.recent[site] = [*self.recent.get(site, []), contribution.flagged][-self.window :]
            lines = self.evidence.get(site, [])
            if contribution.flagged:
                lines = [*lines, f"round {server_round}: {contribution.evidence()}"]
            self.evidence[site] = lines[-self.quarantine_after :] if self.quarantine_after else []
            flags = sum(self.recent[site])
            if not self.quarantine_after or flags < self.quarantine_after or self.holds(site):
                continue
            evidence = f"flagged in {flags} of its last {len(self.recent[site])} rounds: " + "; ".join(
                self.evidence[site]
            )
            self.quarantined[site] = {"round": server_round, "evidence": evidence}
            events.append({"site": site, "round": server_round, "event": "quarantined", "evidence": evidence})
            logger.warning(
                "round %d: site %s quarantined: left out of aggregation from now on (%s). Re-admit it with: "
                "fedmed stop, then fedmed run --resume RUN_DIR --readmit %s",
                server_round,
                site,
                evidence,
                site,
            )
        return events

    def readmit(self, sites: list[str], *, server_round: int) -> list[dict[str, Any]]:
        """The coordinator's decision: these sites take part again, their flag counts start afresh."""
        events = []
        for site in sites:
            if self.quarantined.pop(site, None) is None:
                logger.warning("--readmit %s: the site is not quarantined in this run; nothing to re-admit", site)
                continue
            self.recent.pop(site, None)
            self.evidence.pop(site, None)
            self.vouched.add(site)
            events.append(
                {
                    "site": site,
                    "round": server_round,
                    "event": "readmitted",
                    "evidence": "re-admitted by the coordinator; from now on its updates that differ from the others "
                    "but still point their way are kept at a lower weight, not counted",
                }
            )
            logger.info("round %d: site %s re-admitted by the coordinator", server_round, site)
        return events

    def state(self) -> dict[str, Any]:
        return {
            "recent": dict(self.recent),
            "evidence": dict(self.evidence),
            "quarantined": dict(self.quarantined),
            "vouched": sorted(self.vouched),
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.recent = {site: list(flags) for site, flags in state.get("recent", {}).items()}
        self.evidence = {site: list(lines) for site, lines in state.get("evidence", {}).items()}
        self.quarantined = dict(state.get("quarantined", {}))
        self.vouched = set(state.get("vouched", []))

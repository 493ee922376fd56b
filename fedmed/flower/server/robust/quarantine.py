"""Quarantine: a site flagged in `quarantine_after` consecutive rounds is left out until a person re-admits it.

The book is the coordinator's memory across rounds (consecutive flags per site, who is quarantined and on what
evidence); it is saved in every checkpoint so a resumed run keeps it, and only the coordinator's
`fedmed run --resume RUN --readmit SITE` clears a site. Nothing is deleted: a quarantined site's past rounds,
metrics and evidence stay in the run directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedmed.core.log import logger

from .diagnostics import Contribution


@dataclass
class QuarantineBook:
    quarantine_after: int  # 0: never quarantine
    streaks: dict[str, int] = field(default_factory=dict)  # consecutive flagged rounds, by site
    evidence: dict[str, list[str]] = field(default_factory=dict)  # the flagged rounds' evidence, by site
    quarantined: dict[str, dict[str, Any]] = field(default_factory=dict)  # site -> {"round", "evidence"}

    def holds(self, site: str) -> bool:
        return site in self.quarantined

    def note_round(self, contributions: dict[str, Contribution], *, server_round: int) -> list[dict[str, Any]]:
        """Count this round's flags; the events of the sites quarantined by them."""
        events = []
        for site, contribution in sorted(contributions.items()):
            if not contribution.flagged:
                self.streaks.pop(site, None)
                self.evidence.pop(site, None)
                continue
            self.streaks[site] = self.streaks.get(site, 0) + 1
            self.evidence.setdefault(site, []).append(f"round {server_round}: {contribution.evidence()}")
            if self.quarantine_after and self.streaks[site] >= self.quarantine_after and not self.holds(site):
                evidence = f"flagged {self.quarantine_after} rounds in a row: " + "; ".join(
                    self.evidence[site][-self.quarantine_after :]
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
            self.streaks.pop(site, None)
            self.evidence.pop(site, None)
            events.append(
                {
                    "site": site,
                    "round": server_round,
                    "event": "readmitted",
                    "evidence": "re-admitted by the coordinator",
                }
            )
            logger.info("round %d: site %s re-admitted by the coordinator", server_round, site)
        return events

    def state(self) -> dict[str, Any]:
        return {"streaks": dict(self.streaks), "evidence": dict(self.evidence), "quarantined": dict(self.quarantined)}

    def restore(self, state: dict[str, Any]) -> None:
        self.streaks = dict(state.get("streaks", {}))
        self.evidence = {site: list(lines) for site, lines in state.get("evidence", {}).items()}
        self.quarantined = dict(state.get("quarantined", {}))

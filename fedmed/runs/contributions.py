"""Each site's contribution to the federation, as rounds.jsonl records it (fedmed.flower.server.robust): the
latest round's per-site values and the sites in quarantine for `fedmed status`, and the report's section
"Site contributions".

Rows of runs from before these fields existed carry none of them: every reader here then returns nothing
(no lines, no table, no figure) instead of failing.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from . import plots

SECURE_VIEW = "secure-aggregation"
# A score of 1 or more flags an update (fedmed.flower.server.robust.diagnostics): the line the plot draws.
FLAG_THRESHOLD = 1.0
EVENT_TEXT = ("site", "event", "evidence")  # the quarantine events table's columns after the round
# Beyond this many sites `fedmed status` lists only the sites something happened to.
MAX_SITES_SHOWN = 12
SECURE_LINE = "per-site updates are hidden by secure aggregation; only the sum's norm is checked"


def contribution_rows(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rounds that recorded per-site contributions (none in runs older than the robust rules)."""
    return [row for row in rounds if isinstance(row.get("contributions"), dict)]


def latest_contributions(rounds: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The latest recorded round's per-site values, its rule and what the coordinator could see."""
    rows = contribution_rows(rounds)
    if not rows:
        return None
    row = rows[-1]
    entry: dict[str, Any] = {
        "round": row.get("round"),
        "rule": row.get("robust_rule"),
        "view": str(row.get("contribution_view") or "plaintext"),
        "sites": {
            str(site): dict(values) for site, values in sorted(row["contributions"].items()) if isinstance(values, dict)
        },
    }
    for key in ("aggregate_update_norm", "update_norm_bound", "aggregate_rejected"):
        if row.get(key) is not None:
            entry[key] = row[key]
    return entry


def quarantine_events(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every quarantine and re-admission the run recorded, oldest first."""
    return [event for row in rounds for event in row.get("quarantine_events") or [] if isinstance(event, dict)]


def quarantined_sites(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The sites in quarantine after the latest round, each with the round it was quarantined and the evidence."""
    latest = next((row for row in reversed(rounds) if "sites_quarantined" in row), None)
    if latest is None:
        return []
    events = quarantine_events(rounds)
    found = []
    for site in latest.get("sites_quarantined") or []:
        last = next((e for e in reversed(events) if e.get("site") == site and e.get("event") == "quarantined"), {})
        found.append({"site": str(site), "round": last.get("round"), "evidence": last.get("evidence")})
    return found


# `fedmed status` and the end of a simulation ------------------------------------------------------
def contribution_lines(entry: dict[str, Any]) -> list[str]:
    """A status entry's contributions and quarantined sites as a few lines of text; none for older runs."""
    lines: list[str] = []
    latest = entry.get("contributions")
    if isinstance(latest, dict):
        lines += _latest_lines(latest)
    for site in entry.get("quarantined") or []:
        since = f" since round {site['round']}" if site.get("round") is not None else ""
        evidence = site.get("evidence") or "evidence not recorded"
        lines.append(f"QUARANTINED {site['site']}{since}, left out of aggregation until re-admitted: {evidence}")
        lines.append(f"  re-admit: {site['readmit']}" if site.get("readmit") else "  (the run has finished)")
    return lines


def _latest_lines(latest: dict[str, Any]) -> list[str]:
    sites: dict[str, dict[str, Any]] = latest.get("sites") or {}
    rule = f" (rule {latest['rule']})" if latest.get("rule") else ""
    head = f"site contributions, round {latest.get('round')}{rule}"
    if latest.get("view") == SECURE_VIEW:
        lines = [f"{head}: {SECURE_LINE}{_bound_note(latest)}", f"  {'site':<20} {'train loss':>10}"]
        lines += [f"  {site:<20} {_number(values.get('train_loss'), '.3f'):>10}" for site, values in sites.items()]
        return lines
    shown = sites
    if len(sites) > MAX_SITES_SHOWN:
        shown = {
            site: values
            for site, values in sites.items()
            if values.get("flagged") or values.get("unusual") or values.get("left_out")
        }
    lines = [
        f"{head}:",
        f"  {'site':<20} {'flagged':<8}{'score':>7}{'norm x':>8}{'cosine':>8}{'train loss':>11}{'weight':>8}  left out",
    ]
    for site, values in shown.items():
        lines.append(
            f"  {site:<20} {_verdict(values):<8}{_number(values.get('score'), '.2f'):>7}"
            f"{_number(values.get('norm_ratio'), '.2f'):>8}{_number(values.get('cosine'), '+.2f'):>8}"
            f"{_number(values.get('train_loss'), '.3f'):>11}{_number(values.get('weight'), '.3g'):>8}  "
            f"{values.get('left_out') or '-'}"
        )
    if len(shown) < len(sites):
        lines.append(f"  and {len(sites) - len(shown)} more sites, none flagged or left out")
    return lines


def _verdict(values: dict[str, Any]) -> str:
    """FLAGGED: left out, counts to quarantine; unusual: a re-admitted site's update that differs but still points
    the others' way, kept at a lower weight."""
    return "FLAGGED" if values.get("flagged") else ("unusual" if values.get("unusual") else "-")


def _bound_note(latest: dict[str, Any]) -> str:
    norm, bound = latest.get("aggregate_update_norm"), latest.get("update_norm_bound")
    if not isinstance(norm, (int, float)):
        return ""
    if not isinstance(bound, (int, float)):
        return f" (aggregate update norm {_number(norm, '.3g')})"
    verdict = "OVER the bound" if not norm <= bound else "within the bound"
    if latest.get("aggregate_rejected"):
        verdict = "OVER the bound, aggregate rejected"
    return f" (aggregate update norm {_number(norm, '.3g')}, bound {_number(bound, '.3g')}: {verdict})"


def _number(value: Any, spec: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:{spec}}"


# The report ---------------------------------------------------------------------------------------
def contributions_section(rounds: list[dict[str, Any]], *, plot_dir: Path) -> str:
    """The report's "Site contributions": per-site outlier scores over rounds and the quarantine events; under
    secure aggregation why no single update is shown, each site's training loss and the aggregate's norm."""
    rows = contribution_rows(rounds)
    if not rows:
        return (
            '<h2>Site contributions</h2>\n<p class="muted">Not recorded for this run (its rounds.jsonl has no '
            "per-site contributions).</p>\n"
        )
    rule = rows[-1].get("robust_rule")
    rule_line = f"<p>Aggregation rule: <b>{html.escape(str(rule))}</b>.</p>\n" if rule else ""
    if rows[-1].get("contribution_view") == SECURE_VIEW:
        body = _secure_body(rows, plot_dir=plot_dir)
    else:
        figure = plots.outlier_scores(
            _series(rows, "score"),
            quarantined=_quarantined_rounds(rows),
            threshold=FLAG_THRESHOLD,
            path=plot_dir / "contribution_scores.png",
        )
        body = (
            "<p>Each round every site's update is measured against the other sites' updates: its norm as a multiple "
            "of their median norm and its cosine to their coordinate-wise median update, combined into an outlier "
            "score. A score of 1 or more flags the update (dashed line): it is left out and counts towards "
            "quarantine. For a site the coordinator re-admitted, an update that still points the others' way is only "
            "unusual: kept, its weight scaled by its cosine over the sites' median cosine. Red crosses mark rounds a "
            "site spent in "
            "quarantine, left out of aggregation until the coordinator re-admits it (on the dashed line when it "
            "was not asked to train). Honest sites on different "
            "scanners differ, so a site is judged only against the others, never against a fixed expectation.</p>\n"
            f"{_image(figure, alt='outlier score per site and round')}\n{_flags_summary(rows)}"
        )
    return f"<h2>Site contributions</h2>\n{rule_line}{body}{_events_table(rounds)}"


def _secure_body(rows: list[dict[str, Any]], *, plot_dir: Path) -> str:
    losses = [
        {"phase": "contribution", "site": site, "round": row.get("round"), "train_loss": values.get("train_loss")}
        for row in rows
        for site, values in row["contributions"].items()
        if isinstance(values, dict)
    ]
    loss_figure = plots.learning_curves(
        losses,
        phase="contribution",
        metric="train_loss",
        path=plot_dir / "contribution_losses.png",
        title="each site's reported training loss",
    )
    bounds = [
        (row.get("round"), row.get("aggregate_update_norm"), row.get("update_norm_bound"))
        for row in rows
        if row.get("aggregate_update_norm") is not None
    ]
    norm_figure = plots.aggregate_norms(bounds, path=plot_dir / "aggregate_norm.png") if bounds else None
    bound_text = (
        "With robust.update_norm_bound set, each site's own code scales its update down to the bound before "
        "masking and the coordinator checks the norm of the aggregate (second figure). This bounds the harm of a "
        "faulty site running fedmed's code; it does not protect against a site that runs modified code."
        if norm_figure
        else "No update norm bound was set (robust.update_norm_bound), so not even the aggregate's norm was checked."
    )
    rejected = [str(row.get("round")) for row in rows if row.get("aggregate_rejected")]
    if rejected:
        bound_text += (
            f" <b>Aggregate rejected in round(s) {html.escape(', '.join(rejected))}</b>: the mean update was longer "
            "than any mean of bounded updates can be, so at least one site did not bound its own; the global model "
            "stayed as it was. Which site, secure aggregation cannot tell."
        )
    return (
        "<p>Per-site updates are not shown: under secure aggregation the coordinator receives only the masked sum "
        "of the sites' updates, never a single one, so it cannot measure a site's norm, direction or outlier score, "
        f"nor leave one site out. {bound_text} What the coordinator can see per site is shown instead: the "
        "training loss each site reports.</p>\n"
        f"{_image(loss_figure, alt='training loss per site and round')}\n"
        f"{_image(norm_figure, alt='aggregate update norm against the bound')}\n"
    )


def _series(rows: list[dict[str, Any]], key: str) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for site, values in row["contributions"].items():
            if isinstance(values, dict) and isinstance(values.get(key), (int, float)):
                series.setdefault(str(site), []).append((int(row.get("round", 0)), float(values[key])))
    return series


def _quarantined_rounds(rows: list[dict[str, Any]]) -> dict[str, list[int]]:
    marked: dict[str, list[int]] = {}
    for row in rows:
        left_out = {site for site, v in row["contributions"].items() if (v or {}).get("left_out") == "quarantined"}
        for site in sorted(left_out | set(row.get("sites_quarantined") or [])):
            marked.setdefault(str(site), []).append(int(row.get("round", 0)))
    return marked


def _flags_summary(rows: list[dict[str, Any]]) -> str:
    flagged: dict[str, list[str]] = {}
    unusual: dict[str, list[str]] = {}
    for row in rows:
        for site, values in row["contributions"].items():
            if isinstance(values, dict) and values.get("flagged"):
                left_out = f" (left out: {values['left_out']})" if values.get("left_out") else " (kept)"
                flagged.setdefault(str(site), []).append(f"{row.get('round')}{left_out}")
            elif isinstance(values, dict) and values.get("unusual"):
                unusual.setdefault(str(site), []).append(f"{row.get('round')} (weight × {values.get('trust', 1):.2f})")
    summary = "" if flagged else "<p>No site was flagged.</p>\n"
    for title, found in (("Flagged updates", flagged), ("Unusual updates, kept", unusual)):
        if found:
            items = "".join(
                f"<li>{html.escape(site)}: {'rounds' if len(numbers) > 1 else 'round'} "
                f"{html.escape(', '.join(numbers))}</li>"
                for site, numbers in sorted(found.items())
            )
            summary += f"<p>{title}, by site and round:</p><ul>{items}</ul>\n"
    return summary


def _events_table(rounds: list[dict[str, Any]]) -> str:
    events = quarantine_events(rounds)
    if not events:
        return ""
    body = "".join(
        f"<tr><td>{html.escape(str(event.get('round')))}</td>"
        + "".join(f'<td class="text">{html.escape(str(event.get(key) or "-"))}</td>' for key in EVENT_TEXT)
        + "</tr>"
        for event in events
    )
    head = "".join(f'<th class="text">{key}</th>' for key in EVENT_TEXT)
    return (
        "<h3>Quarantine events</h3>\n<p>A site flagged in robust.quarantine_after of its latest rounds is left out "
        "of aggregation until the coordinator re-admits it (<code>fedmed run --resume RUN_DIR --readmit SITE</code>); "
        f"nothing it sent is deleted.</p>\n<table><tr><th>round</th>{head}</tr>{body}</table>\n"
    )


def _image(figure: Path | None, *, alt: str) -> str:
    if figure is None:
        return ""
    return f'<img src="plots/{html.escape(figure.name)}" alt="{html.escape(alt)}">'

"""How `fedmed status` prints the federation: sites, and per run its state, resume command, rounds with
their refusals, metrics, each site's contribution to the latest round and the quarantined sites with the
command that re-admits each; with --watch, again every few seconds while a run is running."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from fedmed.core.errors import FedmedError
from fedmed.core.terminal import is_terminal

ROUNDS_SHOWN = 10
# A run in these states may still change: --watch goes on while one is.
ACTIVE_STATES = ("running", "submitted")

Report = dict[str, Any]


def report_lines(report: Report) -> list[str]:
    lines = [f"federation {report['federation']}"]
    server = report.get("server", {})
    if server.get("state") == "down":
        lines.append(f"server: DOWN - {server.get('reason')}; runs are shown as their folders tell them")
    lines.append("sites:")
    lines += [
        f"  {site['site']:<20} {site['status']:<12} "
        + (f"node {site['node_id']}" if site["node_id"] is not None else "not registered: see the server log")
        for site in report["sites"]
    ]
    if report.get("unenrolled_nodes"):
        lines.append("NOT ENROLLED (registered with the SuperLink by someone else; never sampled):")
        for node in report["unenrolled_nodes"]:
            named = f" (calls itself '{node['name']}')" if node.get("name") else ""
            lines.append(
                f"  node {node['node_id']:<20} {node['status']:<12}{named} - remove it: FLWR_HOME=<server>/state/"
                f"flwr-home flwr supernode unregister {node['node_id']} fedmed; see server/README.md"
            )
    lines.append("runs:")
    for run in report["runs"]:
        lines += run_lines(run)
    return lines


def active(report: Report) -> bool:
    return any(run.get("state") in ACTIVE_STATES for run in report["runs"])


def watch(
    fetch: Callable[[], Report],
    *,
    interval: float,
    echo: Callable[[str], None],
    live: bool | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Report:
    """Show `fetch()`'s report every `interval` seconds until no run is running; returns the last report.

    In a terminal (`live`, default: stdout is one) the report is redrawn in place; otherwise it is printed
    again only when it changed, so a log of the output holds each state once. A failed fetch after the first
    (the server restarting) is shown and retried; the first one's error goes to the caller. Ctrl-C raises
    KeyboardInterrupt to the caller, which ends the watch."""
    report = fetch()
    if live is None:
        live = is_terminal(sys.stdout)
    screen = _LiveScreen() if live else None
    shown, problem = None, None
    try:
        while True:
            text = "\n".join(report_lines(report))
            if screen is not None:
                screen.show(text, footer=problem or _footer(interval, report))
            elif text != shown:
                echo(f"[{time.strftime('%H:%M:%S')}]\n{text}")
            shown = text
            if not active(report):
                break
            sleep(interval)
            try:
                report, problem = fetch(), None
            except FedmedError as error:  # the last report stays shown, with the reason it is not newer
                problem = f"status unavailable at {time.strftime('%H:%M:%S')} ({error}); retrying every {interval:g} s"
                if screen is None:
                    echo(problem)
    finally:
        if screen is not None:
            screen.close()
    echo("no run is running; stopped watching")
    return report


def _footer(interval: float, report: Report) -> str:
    running = sum(run.get("state") in ACTIVE_STATES for run in report["runs"])
    return f"updated {time.strftime('%H:%M:%S')}, again every {interval:g} s while {running} run(s) go on; Ctrl-C stops"


class _LiveScreen:
    """The report redrawn in place (rich Live); what is on screen at the end stays there."""

    def __init__(self) -> None:
        self._live = Live(console=Console(), auto_refresh=False, redirect_stdout=False, redirect_stderr=False)
        self._live.start()

    def show(self, text: str, *, footer: str) -> None:
        # Text, not markup: run and site names are shown as written.
        self._live.update(Group(Text(text), Text(footer, style="dim")), refresh=True)

    def close(self) -> None:
        self._live.stop()


def run_lines(run: dict[str, Any]) -> list[str]:
    # Deferred: fedmed.runs loads torch, which `fedmed --help` (this module is imported for `fedmed status`)
    # must not wait for.
    from fedmed.runs.contributions import contribution_lines
    from fedmed.runs.summary import describe_client_privacy
    from fedmed.runs.traffic import round_traffic_line

    name = run["run"]
    if run["state"] == "broken":
        return [f"  {name:<32} broken: {run['reason']}"]
    progress = f"round {run['rounds_done']}/{run['rounds']}"
    state = run["state"] + (f" - {run['reason']}" if run.get("reason") else "")
    lines = [f"  {name:<32} {progress:<14} {state}"]
    if run.get("resume"):
        lines.append(f"      resume with: {run['resume']}")
    history = run.get("round_history", [])
    if len(history) > ROUNDS_SHOWN:  # a long run shows the rounds someone missed, and the last one
        history = [row for row in history[:-1] if row["dropped"] or row["refused"]] + history[-1:]
    for row in history:
        parts = [f"trained {', '.join(row['trained']) or 'none'}"]
        why = row.get("why_dropped", {})
        if dropped := [site for site in row["dropped"] if site not in why]:
            parts.append(f"dropped {', '.join(dropped)} (no reply)")
        parts += [f"dropped {site}: {reason}" for site, reason in why.items()]
        parts += [f"refused by {site}: {reason}" for site, reason in row["refused"].items()]
        if traffic := round_traffic_line(row):
            parts.append(traffic)
        lines.append(f"      round {row['round']}: " + "; ".join(parts))
    if run.get("client_privacy"):
        lines.append(f"      {describe_client_privacy(run['client_privacy'])}")
    for site, metrics in sorted(run.get("last_metrics", {}).items()):
        shown = ", ".join(
            f"{key} {value:.3f}"
            for key, value in metrics.items()
            if isinstance(value, float) and key != "loss" and not key.endswith("_seconds")
        )
        stale = f"  (stale: from round {metrics.get('round')})" if metrics.get("stale") else ""
        lines.append(f"      {site:<20} {shown}{stale}")
    # Each site's part in the latest round and any quarantine: absent for runs older than the robust rules.
    lines += [f"      {line}" for line in contribution_lines(run)]
    return lines

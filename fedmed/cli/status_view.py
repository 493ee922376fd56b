"""How `fedmed status` prints one run: state, resume command, rounds with their refusals, metrics."""

from __future__ import annotations

from typing import Any

ROUNDS_SHOWN = 10


def run_lines(run: dict[str, Any]) -> list[str]:
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
        if row["dropped"]:
            parts.append(f"dropped {', '.join(row['dropped'])} (no reply)")
        parts += [f"refused by {site}: {reason}" for site, reason in row["refused"].items()]
        lines.append(f"      round {row['round']}: " + "; ".join(parts))
    for site, metrics in sorted(run.get("last_metrics", {}).items()):
        shown = ", ".join(
            f"{key} {value:.3f}"
            for key, value in metrics.items()
            if isinstance(value, float) and key != "loss" and not key.endswith("_seconds")
        )
        stale = f"  (stale: from round {metrics.get('round')})" if metrics.get("stale") else ""
        lines.append(f"      {site:<20} {shown}{stale}")
    return lines

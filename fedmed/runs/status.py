"""What a run directory says about its run, told truthfully: its state (an `interrupted` run names the
command that resumes it), per round which sites trained, dropped or refused and why, per-site metrics
marked stale when a site did not evaluate in the run's latest evaluation round, each site's contribution to
the latest round and the quarantined sites, each with its evidence and the command that re-admits it.

A run folder that cannot be read is reported as `broken` with the reason; it never stops the others.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from fedmed.config import load_run_config
from fedmed.core.errors import FedmedError

from .contributions import SECURE_VIEW, contribution_lines, contribution_rows, latest_contributions, quarantined_sites
from .run_dir import FLOWER_RUNS, STATUS_FILE, STOPPED_FILE, RunDirectory
from .summary import client_level_privacy

FINAL_STATES = ("completed", "failed", "interrupted")
# Flower's run states that mean its ServerApp is gone: a status.json still saying `running` then is a lie.
SERVER_APP_GONE = ("finished:failed", "finished:stopped", "finished:completed", "unknown")


def process_identity() -> dict[str, Any]:
    """Enough to tell later whether this process still runs (a pid alone can be reused)."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _start_ticks(os.getpid())}


def process_alive(recorded: dict[str, Any]) -> bool | None:
    """Whether the process that wrote `recorded` still runs; None when this machine cannot tell."""
    pid = recorded.get("pid")
    if not isinstance(pid, int) or recorded.get("host") != socket.gethostname():
        return None
    ticks = _start_ticks(pid)
    if ticks is None:
        return False
    return recorded.get("process_start") in (None, ticks)


def effective_state(recorded: dict[str, Any], *, flower_status: str | None = None) -> str:
    """The state to show: status.json's, unless it says `running` for a ServerApp that is gone."""
    gone = flower_status in SERVER_APP_GONE
    if not recorded.get("state"):  # the ServerApp has not started yet, or never did
        return "interrupted" if gone else ("submitted" if flower_status else "unknown")
    state = str(recorded["state"])
    if state != "running":
        return state
    if gone or process_alive(recorded) is False:
        return "interrupted"
    return state


def resume_command(run_dir: Path, *, server_file: Path | None) -> str:
    if server_file is None:  # a simulation
        return f"fedmed simulate --resume {run_dir}"
    return f"fedmed run --resume {run_dir} --server {server_file}"


def readmit_command(run_dir: Path, *, site: str, server_file: Path | None, running: bool) -> str:
    """The command(s) that let a quarantined site back in: a run takes it back only when resumed."""
    deployed = server_file is not None or (run_dir / FLOWER_RUNS).exists()
    if not deployed:  # a simulation: Ctrl-C ends it, resuming re-admits
        resume = f"fedmed simulate --resume {run_dir} --readmit {site}"
        return f"stop it (Ctrl-C), then {resume}" if running else resume
    server = f" --server {server_file}" if server_file is not None else ""
    resume = f"fedmed run --resume {run_dir}{server} --readmit {site}"
    return f"fedmed stop {run_dir.name}{server}, then {resume}" if running else resume


def contribution_status(
    rounds: list[dict[str, Any]], *, run_dir: Path, server_file: Path | None, running: bool, finished: bool
) -> dict[str, Any]:
    """The latest round's per-site contributions and the sites in quarantine, each with its evidence and the
    command that re-admits it (none once the run has finished); empty for runs that recorded neither."""
    entry: dict[str, Any] = {}
    if latest := latest_contributions(rounds):
        entry["contributions"] = latest
    if quarantined := quarantined_sites(rounds):
        for site in quarantined:
            site["readmit"] = (
                None
                if finished
                else readmit_command(run_dir, site=site["site"], server_file=server_file, running=running)
            )
        entry["quarantined"] = quarantined
    return entry


def run_contribution_lines(run_dir: RunDirectory) -> list[str]:
    """What the end of a simulation and `fedmed report` print of the sites' contributions: one line when no site
    was ever flagged, else the latest round's table and any quarantine; nothing for runs that recorded none."""
    rounds = run_dir.read_rounds()
    rows = contribution_rows(rounds)
    if not rows:
        return []
    finished = (run_dir.checkpoints / "final.pt").exists()
    entry = contribution_status(rounds, run_dir=run_dir.path, server_file=None, running=False, finished=finished)
    flagged = any(v.get("flagged") for row in rows for v in row["contributions"].values() if isinstance(v, dict))
    if flagged or entry.get("quarantined") or rows[-1].get("contribution_view") == SECURE_VIEW:
        return contribution_lines(entry)
    rule = f" (rule {rows[-1]['robust_rule']})" if rows[-1].get("robust_rule") else ""
    return [f"site contributions: no site was flagged in {len(rows)} round(s){rule}"]


def round_history(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per round: the sites that trained, dropped (no reply in time) and refused (with the reason they gave), and the
    bytes each site was sent and sent back."""
    return [
        {
            "round": row.get("round"),
            "trained": list(row.get("sites_trained", [])),
            "dropped": list(row.get("sites_dropped", [])),
            "why_dropped": dict(row.get("why_dropped", {})),
            "refused": dict(row.get("sites_refused", {})),
            "upload_bytes": dict(row.get("upload_bytes", {})),
            "download_bytes": dict(row.get("download_bytes", {})),
            "proxy_bytes": dict(row.get("proxy_bytes", {})),
        }
        for row in rounds
    ]


def latest_metrics(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each site's latest evaluation, with its round; `stale` when the site missed the run's latest
    evaluation round (rounds without any evaluation, from eval_every, do not make metrics stale)."""
    latest: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row.get("phase") == "evaluate":
            latest[row["site"]] = {k: v for k, v in row.items() if k not in ("site", "phase", "time")}
    newest = max((int(row.get("round", 0)) for row in latest.values()), default=0)
    for row in latest.values():
        row["stale"] = int(row.get("round", 0)) < newest
    return latest


def describe_run(
    run_dir: RunDirectory,
    *,
    flower_status: str | None = None,
    server_file: Path | None = None,
    server_down: bool = False,
) -> dict[str, Any]:
    """One run's status entry; a folder that cannot be read gives `state: broken` and the reason.

    `server_down`: the coordinator's SuperLink does not answer, so the run folder is all there is to go by."""
    try:
        return _describe(run_dir, flower_status=flower_status, server_file=server_file, server_down=server_down)
    except (FedmedError, OSError, ValueError, KeyError, TypeError) as error:
        return {"run": run_dir.path.name, "state": "broken", "reason": _reason(error)}


def _describe(
    run_dir: RunDirectory, *, flower_status: str | None, server_file: Path | None, server_down: bool
) -> dict[str, Any]:
    config = load_run_config(run_dir.config_file)
    recorded = run_dir.read_json(STATUS_FILE) or {}
    if not isinstance(recorded, dict):
        raise FedmedError(f"{run_dir.path / STATUS_FILE}: not a JSON object; delete it (the run's state is lost)")
    rounds = run_dir.read_rounds()
    state = effective_state(recorded, flower_status=flower_status)
    finished = (run_dir.checkpoints / "final.pt").exists()
    reason = recorded.get("reason")
    stopped = run_dir.read_json(STOPPED_FILE)
    if isinstance(stopped, dict) and state in ("interrupted", "failed") and not finished:
        # Not a crash: the coordinator ended it, and it resumes like an interrupted run.
        state, reason = "interrupted", f"stopped by the coordinator ('fedmed stop' at {stopped.get('time', '?')})"
    elif server_down and recorded.get("state") == "running":
        reason = (
            "running per its folder, but its process is gone; the server is down"
            if state == "interrupted"
            else "running per its folder; the server is down, so it cannot reach the sites"
        )
    elif server_down and state == "unknown":
        reason = "the server is down; its state is unknown until 'fedmed server start'"
    entry: dict[str, Any] = {
        "run": run_dir.path.name,
        "state": state,
        "reason": reason,
        "rounds_done": int(rounds[-1]["round"]) if rounds else 0,
        "rounds": config.train.rounds,
        "round_history": round_history(rounds),
        "last_metrics": latest_metrics(run_dir.read_metrics()),
    }
    if client_dp := client_level_privacy(run_dir):
        entry["client_privacy"] = client_dp
    entry |= contribution_status(
        rounds,
        run_dir=run_dir.path,
        server_file=server_file,
        running=state in ("running", "submitted"),
        finished=finished,
    )
    if state == "interrupted" and not finished:
        entry["resume"] = resume_command(run_dir.path, server_file=server_file)
        if entry["reason"] is None:
            entry["reason"] = "the process running the run ended before it finished"
    return entry


def _reason(error: BaseException) -> str:
    if isinstance(error, FedmedError):
        return str(error).splitlines()[0] if len(str(error)) > 300 else str(error)
    return f"{type(error).__name__}: {error}"


def _start_ticks(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return -1
        return -1

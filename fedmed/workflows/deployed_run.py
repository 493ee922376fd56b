"""A deployed run: the coordinator submits fedmed's app to the live federation's SuperLink, follows,
stops and resumes it, and reports the federation's status.

The ServerApp then runs on the coordinator (started by fedmed's executor under the SuperLink) and
writes the same run directory as a simulation, under the server config's `runs` folder.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from fedmed.config import RunConfig, ServerConfig, load_run_config
from fedmed.core.errors import ConfigError, FedmedError
from fedmed.core.log import logger
from fedmed.deploy import flower_cli
from fedmed.deploy.server import site_nodes_file
from fedmed.flower.records import encode_run
from fedmed.flower.runtime.app_bundle import APP_PROJECT
from fedmed.flower.server.strategies import check_strategy_name
from fedmed.models import check_starting_model
from fedmed.runs import RunDirectory, submissions
from fedmed.runs.progress import RoundTiming, estimate_pace, round_line
from fedmed.runs.readmission import request_readmission
from fedmed.runs.run_dir import FLOWER_RUNS, STATUS_FILE, STOPPED_FILE
from fedmed.runs.status import describe_run, effective_state
from fedmed.runs.tracking import check_tracking
from fedmed.tasks import get_task

FINISHED = ("finished:completed", "finished:failed", "finished:stopped")


@dataclass
class DeployedRun:
    run_dir: RunDirectory
    flower_run_id: int


def registered_sites(server: ServerConfig) -> list[str]:
    return sorted(path.stem for path in server.site_keys.glob("*.pub")) if server.site_keys.is_dir() else []


def check_deployable(config: RunConfig, *, source: str) -> None:
    """A deployed run trains on the sites' own data: a config naming data (a simulation's), or asking for
    MLflow where it is not installed, is refused before anything is contacted or written."""
    sections = [name for name, present in (("[[sites]]", config.sites), ("[synth]", config.synth)) if present]
    if sections:
        raise ConfigError(
            f"{source}: {' and '.join(sections)} describe a simulation's data, but a deployed run trains on the data "
            "each site's own site.toml names. Remove those sections to run on the federation, or run this file "
            "with 'fedmed simulate'."
        )
    check_tracking(config, source=source)  # the ServerApp runs here, on the coordinator: MLflow must be here
    check_strategy_name(config)


def launch(server: ServerConfig, config: RunConfig) -> DeployedRun:
    """Start a new run; the quorum defaults to every registered site."""
    check_deployable(config, source="run config")
    check_starting_model(config.task, config.model, trainable=config.trainable, fedbn=config.strategy.fedbn)
    if config.strategy.min_sites is None:
        sites = registered_sites(server)
        if not sites:
            raise ConfigError(f"no sites are registered in {server.site_keys}; add them with 'fedmed server add-site'")
        config = config.model_copy(deep=True)
        config.strategy.min_sites = len(sites)
    run_dir = RunDirectory.create(server.runs, config.name)
    run_dir.write_config(config)
    return _submit(server, config, run_dir, resume=False)


def resume(server: ServerConfig, run_dir: Path, *, readmit: list[str] | None = None) -> DeployedRun:
    """Continue a run from its last checkpoint (after a coordinator crash, a failed round or a stop), taking back
    the quarantined sites in `readmit`."""
    directory = RunDirectory.to_resume(run_dir, launcher="fedmed run")
    request_readmission(directory, readmit or [])
    return _submit(server, load_run_config(directory.config_file), directory, resume=True)


def _submit(server: ServerConfig, config: RunConfig, run_dir: RunDirectory, *, resume: bool) -> DeployedRun:
    run_config_file = run_dir.path / "flower-run-config.toml"
    site_nodes = {node: site for site, node in _site_nodes(server).items()}
    # The run directory stays here: Flower carries only a one-use token the ServerApp exchanges for it.
    token = submissions.issue(server.superlink.database.parent, run_dir.path)
    run_config_file.write_text(
        tomli_w.dumps(encode_run(config, submission=token, run_id=run_dir.path.name, site_nodes=site_nodes))
    )
    result = flower_cli.start_run(server, app=APP_PROJECT, run_config_file=run_config_file)
    flower_run_id = int(result["run-id"])
    (run_dir.path / STOPPED_FILE).unlink(missing_ok=True)  # a resumed run is no longer the stopped one
    with (run_dir.path / FLOWER_RUNS).open("a", encoding="utf-8") as handle:
        handle.write(
            json.dumps(
                {
                    "flower_run_id": flower_run_id,
                    "fab_hash": result.get("fab-hash"),
                    "resume": resume,
                    "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
                }
            )
            + "\n"
        )
    return DeployedRun(run_dir=run_dir, flower_run_id=flower_run_id)


def flower_run_ids(run_dir: RunDirectory) -> list[int]:
    path = run_dir.path / FLOWER_RUNS
    if not path.exists():
        return []
    return [json.loads(line)["flower_run_id"] for line in path.read_text().splitlines() if line.strip()]


def wait(server: ServerConfig, run: DeployedRun, *, poll_s: float = 2.0, timeout_s: float | None = None) -> str:
    """Follow a run until Flower reports it finished; logs each new round; returns Flower's status."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    reported = 0
    while True:
        rounds = run.run_dir.read_rounds()
        if len(rounds) > reported:
            _log_rounds(run.run_dir, rounds, new=rounds[reported:])
        reported = len(rounds)
        state = _flower_status(server, run.flower_run_id)
        if state in FINISHED:
            _record_interruption(run.run_dir, flower_status=state)
            return state
        if deadline is not None and time.monotonic() > deadline:
            raise FedmedError(f"run {run.run_dir.path.name} still {state} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def _log_rounds(run_dir: RunDirectory, rounds: list[dict[str, Any]], *, new: list[dict[str, Any]]) -> None:
    """The same line per round as a simulation prints (fedmed.runs.progress), from the run directory."""
    config = load_run_config(run_dir.config_file)
    metric = get_task(config.task).primary_metric
    metrics = run_dir.read_metrics()
    scan_geometry = config.task.scan_geometry
    eval_every = config.train.evaluation_interval(scan_geometry=scan_geometry)
    for row in new:
        number = int(row["round"])
        timings = [RoundTiming.from_row(done) for done in rounds if int(done["round"]) <= number]
        # Round 1 of a scan-geometry run fills the sites' caches: not a round to extrapolate from.
        filled = scan_geometry and config.data.cache != "none" and int(rounds[0]["round"]) == 1
        per_round, eta = estimate_pace(
            timings,
            server_round=number,
            total_rounds=config.train.rounds,
            eval_every=eval_every,
            first_filled_cache=filled,
        )
        phases = {
            phase: {m["site"]: m for m in metrics if m.get("round") == number and m.get("phase") == phase}
            for phase in ("train", "evaluate")
        }
        line = round_line(
            number,
            config.train.rounds,
            metric=metric,
            train=phases["train"],
            evaluation=phases["evaluate"],
            per_round=per_round,
            eta=eta,
        )
        logger.info("%s: %s", run_dir.path.name, line)


def _flower_status(server: ServerConfig, flower_run_id: int) -> str:
    for run in flower_cli.list_runs(server):
        if int(run["run-id"]) == flower_run_id:
            return str(run["status"])
    return "unknown"


def stop(server: ServerConfig, run_dir_or_id: str) -> int:
    """Stop a run given its run-directory name or Flower run id; returns the Flower run id."""
    target = server.runs / run_dir_or_id
    if target.is_dir():
        ids = flower_run_ids(RunDirectory(target))
        if not ids:
            raise FedmedError(f"{target} was never submitted to the SuperLink")
        flower_run_id = ids[-1]
    elif run_dir_or_id.isdigit():
        flower_run_id = int(run_dir_or_id)
    else:
        raise FedmedError(f"'{run_dir_or_id}' is neither a run in {server.runs} nor a Flower run id")
    flower_cli.stop_run(server, flower_run_id)
    stopped = _run_of(server, flower_run_id)
    if stopped is not None and flower_run_ids(stopped)[-1] == flower_run_id:
        # So that `fedmed status` tells this from a crash.
        stopped.write_json(
            STOPPED_FILE,
            {"flower_run_id": flower_run_id, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "by": "fedmed stop"},
        )
    return flower_run_id


def _run_of(server: ServerConfig, flower_run_id: int) -> RunDirectory | None:
    """The run directory a Flower run was submitted for, if it is one of this coordinator's."""
    for path in sorted(server.runs.glob("*/" + FLOWER_RUNS)):
        run_dir = RunDirectory(path.parent)
        try:
            if flower_run_id in flower_run_ids(run_dir):
                return run_dir
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def _record_interruption(run_dir: RunDirectory, *, flower_status: str) -> None:
    """A ServerApp that died (killed, stopped by Flower) never wrote its end: write it for it."""
    try:
        recorded = run_dir.read_json(STATUS_FILE) or {}
    except FedmedError:
        return
    if effective_state(recorded, flower_status=flower_status) == "interrupted" and recorded.get("state") == "running":
        reason = f"the ServerApp ended without finishing (Flower: {flower_status})"
        run_dir.write_json(STATUS_FILE, {"state": "interrupted", "reason": reason})


def status(server: ServerConfig, *, server_file: Path | None = None) -> dict[str, Any]:
    """Sites (connected or not), nodes the SuperLink knows that are not enrolled, and every run with its
    state (an interrupted one with the command that resumes it), per-round participation, latest
    per-site metrics, each site's contribution to the latest round and the quarantined sites with the
    command that re-admits each; an unreadable run is `broken`. With the server down, the runs as their
    folders tell them."""
    problem = None
    try:
        nodes = {int(node["node-id"]): node for node in flower_cli.list_nodes_with_keys(server)}
        flower_runs = {int(run["run-id"]): run for run in flower_cli.list_runs(server)}
    except flower_cli.ServerNotRunningError as down:
        nodes, flower_runs, problem = {}, {}, str(down)
    site_nodes = _site_nodes(server)
    sites = []
    for site in registered_sites(server):
        node = nodes.get(site_nodes.get(site, -1), {})
        shown = "server down" if problem else node.get("status", "unknown")
        sites.append({"site": site, "node_id": site_nodes.get(site), "status": shown})
    enrolled = set(site_nodes.values())
    # A node registered on the loopback Control API by anyone but fedmed: never sampled, always shown.
    unenrolled = [
        {"node_id": node_id, "status": node["status"], "name": node.get("name") or None}
        for node_id, node in sorted(nodes.items())
        if node_id not in enrolled and node["status"] != "unregistered"
    ]
    runs = []
    for path in sorted(server.runs.glob("*/config.toml")):
        run_dir = RunDirectory(path.parent)
        try:
            ids = flower_run_ids(run_dir)
        except (OSError, ValueError, KeyError, TypeError) as error:
            runs.append({"run": run_dir.path.name, "state": "broken", "reason": f"{FLOWER_RUNS}: {error}"})
            continue
        if problem:
            flower_status = None
        else:
            latest = flower_runs.get(ids[-1], {}) if ids else {}
            flower_status = latest.get("status", "not submitted" if not ids else "unknown")
        entry = describe_run(
            run_dir,
            flower_status=flower_status if ids else None,
            server_file=server_file,
            server_down=problem is not None,
        )
        runs.append(
            {
                "run": entry.pop("run"),
                "flower_run_id": ids[-1] if ids else None,
                "flower_status": flower_status,
                **entry,
            }
        )
    return {
        "federation": server.federation,
        "server": {"state": "down", "reason": problem} if problem else {"state": "up"},
        "sites": sites,
        "unenrolled_nodes": unenrolled,
        "runs": runs,
    }


def _site_nodes(server: ServerConfig) -> dict[str, int]:
    path = site_nodes_file(server)
    return {site: int(node) for site, node in json.loads(path.read_text()).items()} if path.exists() else {}

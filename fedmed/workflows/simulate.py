"""Simulate a federation on one machine: data, engine, baselines, summary and report."""

from __future__ import annotations

import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmed.config import RunConfig, SiteEntry, load_run_config
from fedmed.core.errors import ConfigError, FedmedError
from fedmed.core.files import unwritable_reason
from fedmed.core.log import logger
from fedmed.data import load_site, read_manifest, synthesize_federation
from fedmed.data.manifest import parse_manifest
from fedmed.data.npz import is_npz_site
from fedmed.data.scan_site import open_scan_site
from fedmed.flower.engines import run_federation_here
from fedmed.flower.records import encode_run
from fedmed.flower.server.strategies import check_strategy_name
from fedmed.models import check_starting_model
from fedmed.models.memory import check_training_memory
from fedmed.runs import RunDirectory
from fedmed.runs.cross_site import final_evaluation, local_only_model_name, record_evaluation
from fedmed.runs.outputs import write_outputs
from fedmed.runs.readmission import request_readmission
from fedmed.runs.run_dir import BASELINES_FILE, DP_PLAN_FILE, PRETRAIN_DIR, STATUS_FILE, SUMMARY_FILE
from fedmed.runs.status import resume_command
from fedmed.runs.summary import format_summary
from fedmed.runs.tracking import check_tracking
from fedmed.site.session import SiteSession, SiteSpec
from fedmed.tasks import get_task
from fedmed.tasks.start_weights import pretrained_start

from . import baselines


@dataclass
class SimulationResult:
    run_dir: RunDirectory
    summary: dict[str, Any]
    config: RunConfig  # resolved: generated sites listed under `sites`

    def table(self) -> str:
        return format_summary(self.summary)


def materialize_sites(config: RunConfig) -> RunConfig:
    """Generate the synthetic federation if the config asks for one, and list its sites."""
    if config.synth is None or config.sites:
        return config
    fingerprint = zlib.crc32(config.synth.model_dump_json().encode())
    target = config.output_dir / "data" / f"{config.synth.task}-{fingerprint:08x}"
    entries = synthesize_federation(config.synth, target)
    resolved = config.model_copy(deep=True)
    resolved.sites = [SiteEntry(name=entry.name, path=entry.path) for entry in entries]
    return resolved


def simulate(config: RunConfig, *, run_dir: RunDirectory | None = None, source: str = "run config") -> SimulationResult:
    """Run the federation and its baselines; with `run_dir` (a resume) continue from its last checkpoint.

    Everything that can be checked from the config and the data is checked before the run directory
    exists, so a bad input leaves no half-made run behind."""
    if not config.sites and config.synth is None:
        raise ConfigError(
            f"{source}: a simulation needs data: add [[sites]] entries (name, path) or a [synth] section that "
            "generates them"
        )
    if run_dir is None and (problem := unwritable_reason(config.output_dir)):
        raise ConfigError(
            f"{source}: cannot write to output_dir {config.output_dir} ({problem}); set output_dir to a folder you "
            "can write (or --set output_dir=PATH), or fix that folder's permissions"
        )
    check_training_memory(config, source=source)
    check_tracking(config, source=source)
    check_strategy_name(config)
    config = materialize_sites(config)
    # Load (and so validate) every site before any training: a bad site fails the run up front.
    sites = {site.name: _open_site(site.path, config=config) for site in config.sites}
    for name, data in sites.items():
        logger.info("site %s: %d training, %d validation cases", name, data.num_train, data.num_val)
    config = resolve_from_data(config, channels={name: _channels(data) for name, data in sites.items()}, source=source)
    check_starting_model(config.task, config.model, trainable=config.trainable, fedbn=config.strategy.fedbn)

    created = run_dir is None
    run_dir = run_dir or RunDirectory.create(config.output_dir, config.name)
    run_dir.write_config(config)
    logger.info("run directory: %s", run_dir.path)

    try:
        run_engine(config, run_dir=run_dir)
    except KeyboardInterrupt:
        run_dir.write_json(STATUS_FILE, {"state": "interrupted", "reason": "stopped with Ctrl-C"})
        raise RunInterruptedError(run_dir) from None
    except BaseException:
        if created:
            _remove_if_empty(run_dir)
        raise

    task = get_task(config.task)
    if config.baselines.local_only or config.baselines.pooled:
        _run_baselines(config, run_dir=run_dir)
        # The ServerApp wrote the outputs at its end; the baselines add columns and cross-site rows.
        summary = write_outputs(run_dir, primary_metric=task.primary_metric, higher_is_better=task.higher_is_better)
    else:
        summary = run_dir.read_json(SUMMARY_FILE) or write_outputs(
            run_dir, primary_metric=task.primary_metric, higher_is_better=task.higher_is_better
        )
    return SimulationResult(run_dir=run_dir, summary=summary, config=config)


def run_engine(config: RunConfig, *, run_dir: RunDirectory) -> None:
    """Run the federation of `config` (its sites listed) to completion with its engine, writing into `run_dir`:
    no checks, no baselines, no outputs beyond what the ServerApp writes (`simulate` adds those)."""
    run_federation_here(
        config.engine,
        num_sites=len(config.sites),
        run_config=encode_run(config, run_dir=run_dir.path, run_id=run_dir.path.name),
        run_id=zlib.crc32(run_dir.path.name.encode()),
    )


def _open_site(path: Path, *, config: RunConfig) -> Any:
    if config.task.scan_geometry:
        # Validation only: the sites' sessions open their own datasets and caches.
        return open_scan_site(path, config=config, cache_dir=None, check_only=True)
    return load_site(path, task=config.task)


def _channels(data: Any) -> int:
    return int(getattr(data, "channels", 0) or (data.train[0]["image"].shape[0] if data.train else 1))


def resolve_from_data(config: RunConfig, *, channels: dict[str, int], source: str) -> RunConfig:
    """Fill what the config leaves to the data: the network's input channels (one per modality), their modality
    names when the sites' dataset.json files agree on them and, for multi-class segmentation, the class names of
    the first site's dataset.json."""
    counts = sorted(set(channels.values()))
    if len(counts) > 1:
        listing = ", ".join(f"{name}: {count}" for name, count in channels.items())
        raise ConfigError(
            f"{source}: the sites' images have different numbers of channels ({listing}); every site must give the "
            "same modalities in the same order"
        )
    task = config.task
    update: dict[str, Any] = {}
    if task.in_channels is None and counts:
        update["in_channels"] = counts[0]
    names = _sites_channel_names(config) if task.channel_names is None else None
    if names and len(names) == update.get("in_channels", task.channels):
        update["channel_names"] = names  # what an exported bundle says goes in, and how it matches files
    first = config.sites[0].path if config.sites else None
    named = task.kind != "segmentation" or task.num_classes == 2 or task.class_names is not None
    if not named and first is not None and not is_npz_site(first):
        labels = read_manifest(first).labels
        names = [labels.get(value, f"class{value}") for value in range(1, task.num_classes)]
        update["class_names"] = [name.strip().replace(" ", "_").lower() for name in names]
    if not update:
        return config
    resolved = config.model_copy(deep=True)
    resolved.task = task.model_copy(update=update)
    return resolved


def _sites_channel_names(config: RunConfig) -> list[str] | None:
    """The modality names of the sites' dataset.json files when every site names the same ones in the same order."""
    if not config.sites or any(is_npz_site(site.path) for site in config.sites):
        return None
    manifests = [parse_manifest(site.path)[0] for site in config.sites]  # validated already: no warnings again
    if any(manifest is None for manifest in manifests):
        return None
    named = [manifest.modality for manifest in manifests if manifest is not None]
    lists = {tuple(modality[index].lower() for index in sorted(modality)) for modality in named}
    if len(lists) != 1 or not named[0]:
        return None
    return [named[0][index] for index in sorted(named[0])]


def resume_simulation(path: Path, *, readmit: list[str] | None = None) -> SimulationResult:
    """Continue an interrupted simulation from its last checkpoint, taking back the quarantined sites in `readmit`."""
    run_dir = RunDirectory.to_resume(path, launcher="fedmed simulate")
    request_readmission(run_dir, readmit or [])
    return simulate(load_run_config(run_dir.config_file), run_dir=run_dir, source=str(run_dir.config_file))


class RunInterruptedError(FedmedError):
    """The person running the simulation stopped it (Ctrl-C); the run can be resumed."""

    def __init__(self, run_dir: RunDirectory) -> None:
        rounds = run_dir.read_rounds()
        done = f"after round {rounds[-1]['round']}" if rounds else "before its first round finished"
        super().__init__(
            f"run {run_dir.path.name} interrupted {done}; its status is 'interrupted'. Continue it from its last "
            f"checkpoint with: {resume_command(run_dir.path, server_file=None)}"
        )


def _remove_if_empty(run_dir: RunDirectory) -> None:
    """A run that failed before finishing a round leaves nothing worth keeping: no stub folder. One the sites'
    DP-SGD plans stopped is kept: its dp_plan.json, status and summary say why, and its sites' ledgers hold the
    plans."""
    if run_dir.rounds_jsonl.exists() or run_dir.checkpoints.exists() or (run_dir.path / DP_PLAN_FILE).exists():
        return
    shutil.rmtree(run_dir.path, ignore_errors=True)
    logger.info("removed %s: the run failed before its first round", run_dir.path)


def _run_baselines(config: RunConfig, *, run_dir: RunDirectory) -> None:
    """Local-only and pooled training on the sites' data as the federation saw it (same normalization), scored
    at every site; their scores join the final cross-site evaluation."""
    sites = {
        site.name: SiteSession(
            SiteSpec(name=site.name, data_path=site.path, state_dir=run_dir.site_dir(site.name)), config
        ).data
        for site in config.sites
    }
    init = None
    if config.pretrain.enabled:  # the weights the federation started from, kept in the run directory
        init, _ = pretrained_start(config, folder=run_dir.path / PRETRAIN_DIR)
    results, cross = {}, {}
    if config.baselines.local_only:
        results["local_only"], models = baselines.local_only(config, sites, init=init)
        for name, model in models.items():
            cross[local_only_model_name(name)] = baselines.score_everywhere(config, model, sites)
    if config.baselines.pooled:
        results["pooled"], _ = baselines.pooled(config, sites, init=init)
        cross["pooled"] = results["pooled"]
    run_dir.write_json(BASELINES_FILE, results)
    final = final_evaluation(run_dir)
    if final is not None:
        final["metrics"].update(cross)
        final["models"] = list(final["metrics"])
        task = get_task(config.task)
        record_evaluation(run_dir, final, metric=task.primary_metric, higher_is_better=task.higher_is_better)

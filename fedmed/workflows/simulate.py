"""Simulate a federation on one machine: data, engine, baselines, summary and report."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

from fedmed.config import RunConfig, SiteEntry
from fedmed.core.errors import ConfigError
from fedmed.core.log import logger
from fedmed.runs import RunDirectory
from fedmed.runs.run_dir import BASELINES_FILE, SUMMARY_FILE
from fedmed.runs.summary import build_summary, format_summary


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
    from fedmed.data import synthesize_federation

    fingerprint = zlib.crc32(config.synth.model_dump_json().encode())
    target = config.output_dir / "data" / f"{config.synth.task}-{fingerprint:08x}"
    entries = synthesize_federation(config.synth, target)
    resolved = config.model_copy(deep=True)
    resolved.sites = [SiteEntry(name=entry.name, path=entry.path) for entry in entries]
    return resolved


def simulate(config: RunConfig, *, run_dir: RunDirectory | None = None) -> SimulationResult:
    from fedmed.data import load_site
    from fedmed.flower.engines import run_federation_here
    from fedmed.flower.records import encode_run
    from fedmed.runs.report import write_report
    from fedmed.tasks import get_task

    if not config.sites and config.synth is None:
        raise ConfigError(
            "a simulation needs data: add [[sites]] entries (name, path) or a [synth] section that generates them"
        )
    config = materialize_sites(config)
    run_dir = run_dir or RunDirectory.create(config.output_dir, config.name)
    run_dir.write_config(config)
    logger.info("run directory: %s", run_dir.path)

    # Load (and so validate) every site before any training: a bad site fails the run up front.
    sites = {site.name: load_site(site.path, task=config.task) for site in config.sites}
    for name, data in sites.items():
        logger.info("site %s: %d training, %d validation cases", name, len(data.train), len(data.val))

    run_config = encode_run(config, run_dir=run_dir.path, run_id=run_dir.path.name)
    run_federation_here(
        config.engine, num_sites=len(config.sites), run_config=run_config, run_id=zlib.crc32(run_dir.path.name.encode())
    )

    if config.baselines.local_only or config.baselines.pooled:
        _run_baselines(config, run_dir=run_dir)

    task = get_task(config.task)
    summary = build_summary(run_dir, primary_metric=task.primary_metric, higher_is_better=task.higher_is_better)
    run_dir.write_json(SUMMARY_FILE, summary)
    write_report(run_dir)
    return SimulationResult(run_dir=run_dir, summary=summary, config=config)


def _run_baselines(config: RunConfig, *, run_dir: RunDirectory) -> None:
    """Local-only and pooled training on the sites' data as the federation saw it (same normalization), scored
    at every site; their scores join the final cross-site evaluation."""
    from fedmed.runs.cross_site import final_evaluation, local_only_model_name, record_evaluation
    from fedmed.site.session import SiteSession, SiteSpec
    from fedmed.tasks import get_task

    from . import baselines

    sites = {
        site.name: SiteSession(
            SiteSpec(name=site.name, data_path=site.path, state_dir=run_dir.site_dir(site.name)), config
        ).data
        for site in config.sites
    }
    results, cross = {}, {}
    if config.baselines.local_only:
        results["local_only"], models = baselines.local_only(config, sites)
        for name, model in models.items():
            cross[local_only_model_name(name)] = baselines.score_everywhere(config, model, sites)
    if config.baselines.pooled:
        results["pooled"], _ = baselines.pooled(config, sites)
        cross["pooled"] = results["pooled"]
    run_dir.write_json(BASELINES_FILE, results)
    final = final_evaluation(run_dir)
    if final is not None:
        final["metrics"].update(cross)
        final["models"] = list(final["metrics"])
        task = get_task(config.task)
        record_evaluation(run_dir, final, metric=task.primary_metric, higher_is_better=task.higher_is_better)

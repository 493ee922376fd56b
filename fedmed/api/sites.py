"""The sites' data: a synthetic federation generated, a site's cases loaded as the federation loads them."""

from __future__ import annotations

import os
from pathlib import Path

from fedmed.config import RunConfig, SiteEntry, SynthConfig, TaskConfig
from fedmed.data import SiteData
from fedmed.data import load_site as _load_site
from fedmed.data import synthesize_federation as _synthesize_federation
from fedmed.workflows import simulate as simulation


def materialize_sites(config: RunConfig) -> RunConfig:
    """Generate the synthetic federation a [synth] section describes, and list its sites.

    Args:
        config: A run config; one that lists [[sites]] (or has no [synth]) is returned as it is.

    Returns:
        A copy of the config whose `sites` are the generated folders (under `output_dir`/data, reused
        when generated from the same [synth] before).
    """
    return simulation.materialize_sites(config)


def site_data(config: RunConfig) -> dict[str, SiteData]:
    """Every site's training and validation cases, loaded as the federation's sites load them.

    Args:
        config: A run config; a [synth] federation is generated first (`materialize_sites`).

    Returns:
        Site name to its data (`.train`, `.val`, `.num_train`, `.num_val`).

    Raises:
        FedmedError: A site's data do not validate (every problem is listed).
    """
    listed = simulation.materialize_sites(config)
    return {site.name: _load_site(site.path, task=listed.task) for site in listed.sites}


def load_site(path: str | os.PathLike[str], *, task: TaskConfig) -> SiteData:
    """One site's data: a folder with a dataset.json, or a MedMNIST-style .npz file.

    Args:
        path: The site folder (or its dataset.json) or .npz file.
        task: The task the data must fit (`config.task`).

    Returns:
        Its training and validation cases.

    Raises:
        FedmedError: The data do not validate (every problem is listed).
    """
    return _load_site(Path(path), task=task)


def synthesize_federation(
    synth: SynthConfig, out_dir: str | os.PathLike[str], *, overwrite: bool = False
) -> list[SiteEntry]:
    """Write a synthetic federation of NIfTI sites with per-site scanner drift, as `fedmed synth` does.

    Args:
        synth: What to generate: task, image size, cases, and one drift per site.
        out_dir: The folder for one sub-folder per site.
        overwrite: Replace sites generated there from a different [synth] (same one: reused).

    Returns:
        One [[sites]] entry (name, path) per generated site.
    """
    return _synthesize_federation(synth, Path(out_dir), overwrite=overwrite)

"""Run configs, small data, rogue nodes and teardown for the deployment tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import pytest

from fedmed.config import SiteDrift, SynthConfig
from fedmed.data import synthesize_federation
from fedmed.deploy.local import LocalFederation, alive, descendants, free_port
from fedmed.deploy.proxy import ProxyError, find_nginx
from fedmed.flower.runtime import supernode


def require_nginx() -> None:
    """For a test's own federation (as conftest's shared one): skip without nginx, fail under FEDMED_REQUIRE_NGINX=1."""
    try:
        find_nginx()
    except ProxyError as missing:
        if os.environ.get("FEDMED_REQUIRE_NGINX") == "1":
            pytest.fail(f"{missing} (FEDMED_REQUIRE_NGINX=1 makes this a failure, not a skip)")
        pytest.skip(f"{missing}; or set FEDMED_REQUIRE_NGINX=1 to fail instead of skipping")


@contextmanager
def running_federation(
    root: Path, synth: SynthConfig, *, slow: dict[str, float] | None = None
) -> Iterator[LocalFederation]:
    """A coordinator and one site per site of `synth`, provisioned, started and, at the end, stopped with nothing
    left running. `slow` sends these sites' uploads through a slow link at that many bytes/s."""
    require_nginx()
    sites = synthesize_federation(synth, root / "data")
    federation = LocalFederation(root, site_data={site.name: site.path for site in sites})
    federation.provision()
    for site, rate in (slow or {}).items():
        federation.slow_link(site, upload_rate=rate)
    try:
        federation.start()
        yield federation
    finally:
        close_leaving_nothing(federation)


def run_config(federation: LocalFederation, name: str, **sections: dict[str, Any]) -> Path:
    """A small segmentation run on the test sites; `sections` override parts of it."""
    config: dict[str, Any] = {
        "name": name,
        "seed": 3,
        "task": {"kind": "segmentation", "spatial_dims": 2, "image_size": [32, 32]},
        "model": {"channels": [8, 16]},
        "train": {"rounds": 2, "learning_rate": 0.003},
        "strategy": {"round_timeout_s": 60},
        # A few cases per site: planning at σ 2 keeps a DP run few-step and below the mostly-noise line, where the
        # default σ 4 would plan the step cap (the plan check has its own tests).
        "dp_sgd": {"noise_multiplier": 2.0},
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value}
    return federation.write_run_config(config)


def one_site_data(root: Path) -> Path:
    """Site "a"'s folder of a tiny 2D segmentation data set (two training cases, one validation case)."""
    synth = SynthConfig(
        task="segmentation",
        spatial_dims=2,
        image_size=[16, 16],
        train_cases=2,
        val_cases=1,
        seed=1,
        sites=[SiteDrift(name="a")],
    )
    return synthesize_federation(synth, root)[0].path


def close_leaving_nothing(federation: LocalFederation) -> None:
    """Stop every party of a test's federation and check that none of their processes is left."""
    pids = [pid for daemon in federation.daemons.values() for pid in [daemon.pid, *descendants(daemon.pid)]]
    federation.close()
    left = [pid for pid in pids if alive(pid)]
    assert not left, f"processes left running: {left}"


def rogue_supernode(*, address: str, ca_certificate: Path, private_key: Path, output: IO[bytes]) -> subprocess.Popen:
    """A SuperNode that fedmed did not start: its own node key, no client certificate, polling every 0.25 s."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            supernode.__name__,
            "0.25",
            "--superlink",
            address,
            "--root-certificates",
            str(ca_certificate),
            "--auth-supernode-private-key",
            str(private_key),
            "--isolation",
            "process",
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
        ],
        stdout=output,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

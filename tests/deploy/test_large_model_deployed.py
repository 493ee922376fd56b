"""A network of clinical size through the deployed path: a 54 M-parameter 3D UNet (217 MB of float32 per update)
trains one round behind the proxy with three SuperNodes over TLS, its updates compressed to 8 bits; each site's
audit log holds the bytes the coordinator counted on receipt, and the proxy counted the same reply crossing it."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from deploy_helpers import run_config, running_federation

from fedmed.config import SiteDrift, SynthConfig, load_site_config
from fedmed.deploy.local import LocalFederation
from fedmed.site.audit import AuditLog, audit_path

pytestmark = [pytest.mark.integration, pytest.mark.slow]
# MONAI's UNet, 5 levels at these widths, one residual unit: 54.3 M parameters.
WIDE_UNET = {"name": "unet", "channels": [80, 160, 320, 640, 1024]}
PARAMETERS = 54_345_692


@pytest.fixture(scope="module")
def federation_3d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    synth = SynthConfig(
        task="segmentation",
        spatial_dims=3,
        image_size=[32, 32, 32],
        train_cases=2,
        val_cases=1,
        seed=1,
        sites=[SiteDrift(name=name) for name in ("a", "b", "c")],
    )
    with running_federation(tmp_path_factory.mktemp("large-model"), synth) as federation:
        yield federation


def test_a_54m_parameter_model_trains_a_round_through_the_proxy(federation_3d: LocalFederation) -> None:
    config_file = run_config(
        federation_3d,
        "large-model",
        task={"spatial_dims": 3, "image_size": [32, 32, 32]},
        model=WIDE_UNET,
        train={"rounds": 1, "local_steps": 1, "batch_size": 2, "learning_rate": 1e-4},
        strategy={"round_timeout_s": 900},
        evaluation={"finetune_epochs": 0},
        compression={"bits": 8},
    )
    completed = federation_3d.run(config_file, "--wait")
    assert "finished:completed" in completed.stdout, completed.stdout + completed.stderr
    name = completed.stdout.split("run directory: ")[1].split("/")[-1].split()[0]
    run_dir = federation_3d.workspace / "server" / "runs" / name
    (row,) = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert row["sites_trained"] == ["a", "b", "c"]
    for site in ("a", "b", "c"):
        # The global model went out as float32; the update came back at a byte per value plus a scale per 2048.
        assert row["download_bytes"][site] > 4 * PARAMETERS
        assert PARAMETERS < row["upload_bytes"][site] < 0.26 * 4 * PARAMETERS
        assert row["upload_bytes"][site] <= row["proxy_bytes"][site]["replies"] < 1.01 * row["upload_bytes"][site]
        updates = [record for record in _sent(federation_3d, site) if record["kind"] == "model-update"]
        assert [record["bytes"] for record in updates] == [row["upload_bytes"][site]]


def _sent(federation: LocalFederation, site: str) -> list[dict]:
    log = AuditLog(audit_path(load_site_config(federation.site_config(site)).state_dir))
    return [record for record in log.records() if record["event"] == "message-sent"]

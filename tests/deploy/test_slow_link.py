"""A site behind a slow uplink (fedmed.deploy.slow_link: a paced relay between its SuperNode and the proxy).

Its upload, under way when the round deadline passes, is waited for and counted; an upload that stops is given
up once no byte of it has reached the proxy for `strategy.upload_stall_s`, and the round's row says which site
it was and how many bytes were left. Every round's row holds the bytes that crossed the proxy per site."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_helpers import run_config, running_federation

from fedmed.config import SiteDrift, SynthConfig
from fedmed.deploy.local import LocalFederation, wait_for
from fedmed.deploy.ports import free_port
from fedmed.deploy.slow_link import SlowLink

pytestmark = [pytest.mark.integration]

# A 2D UNet of 379 k parameters: 1.5 MB of float32 per update, 15 s at the slow site's 100 kB/s.
MODEL = {"channels": [32, 64, 128], "num_res_units": 2}
SLOW_RATE = 100_000
TIMEOUT_S = 8


@pytest.fixture(scope="module")
def slow_b(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalFederation, SlowLink]]:
    synth = SynthConfig(
        task="segmentation",
        spatial_dims=2,
        image_size=[32, 32],
        train_cases=2,
        val_cases=1,
        seed=1,
        sites=[SiteDrift(name="a"), SiteDrift(name="b")],
    )
    root = tmp_path_factory.mktemp("slow-link")
    with running_federation(root, synth, slow={"b": SLOW_RATE}) as federation:
        yield federation, federation.links[0]


def _config(federation: LocalFederation, name: str, **strategy: object) -> Path:
    return run_config(
        federation,
        name,
        model=MODEL,
        train={"rounds": 1, "local_steps": 1, "batch_size": 2},
        strategy={"round_timeout_s": TIMEOUT_S, **strategy},
        evaluation={"finetune_epochs": 0},
    )


def _row(run_dir: Path) -> dict:
    (row,) = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    return row


def test_an_upload_under_way_at_the_deadline_is_waited_for(slow_b: tuple[LocalFederation, SlowLink]) -> None:
    federation, _ = slow_b
    completed = federation.run(_config(federation, "slow-upload"), "--wait")
    assert "finished:completed" in completed.stdout, completed.stdout + completed.stderr
    run_dir = Path(completed.stdout.split("run directory: ")[1].split()[0])
    row = _row(run_dir)
    assert row["sites_trained"] == ["a", "b"]
    assert row["train_phase_s"] > TIMEOUT_S + 3, "site b's 1.5 MB at 100 kB/s should outlast the round timeout"
    proxy = row["proxy_bytes"]
    for site in ("a", "b"):
        # What crossed the proxy holds the reply Flower counted, plus the HTTP framing of its requests.
        assert row["upload_bytes"][site] <= proxy[site]["replies"] < 1.05 * row["upload_bytes"][site] + 50_000
        assert proxy[site]["to_site"] > row["download_bytes"][site]


def test_a_stalled_upload_is_given_up_and_named_with_the_bytes_left(slow_b: tuple[LocalFederation, SlowLink]) -> None:
    federation, link = slow_b
    config = _config(federation, "stalled-upload", min_sites=1, upload_stall_s=3)
    before = link.uploaded
    run_dir = federation.submit(config)
    try:
        wait_for(lambda: link.uploaded - before > 400_000, timeout=120, what="site b's upload to be under way")
        link.hold()  # its link goes silent mid-upload
        wait_for(lambda: (run_dir / "rounds.jsonl").exists(), timeout=120, what="the round to end without b")
    finally:
        link.release()
    row = _row(run_dir)
    assert row["sites_trained"] == ["a"]
    assert row["sites_dropped"] == ["b"]
    why = row["why_dropped"]["b"]
    assert "did not finish" in why and "were left (site a's reply" in why, why
    assert "none of it arrived for 3 s (strategy.upload_stall_s)" in why, why


def test_the_link_paces_uploads_holds_them_and_passes_every_byte() -> None:
    payload = bytes(range(256)) * 1200  # 307 kB
    received = bytearray()
    with socket.create_server(("127.0.0.1", free_port())) as sink:
        target = sink.getsockname()

        def drain() -> None:
            connection, _ = sink.accept()
            with connection:
                while chunk := connection.recv(65536):
                    received.extend(chunk)

        reader = threading.Thread(target=drain)
        reader.start()
        with SlowLink(target, upload_rate=1_000_000, download_rate=None) as link:
            started = time.monotonic()
            with socket.create_connection(("127.0.0.1", link.port)) as site:
                site.sendall(payload[:100_000])
                wait_for(lambda: len(received) == 100_000, timeout=10, what="the first 100 kB", interval=0.01)
                link.hold()
                site.sendall(payload[100_000:])
                time.sleep(0.3)
                held = len(received)
                link.release()
            reader.join(timeout=10)
            elapsed = time.monotonic() - started
    assert bytes(received) == payload
    assert held <= 100_000 + 16 * 1024, "at most the piece already paced passes while the link is held"
    # 307 kB at 1 MB/s, plus the 0.3 s held: a lower bound only (a loaded machine is slower, never faster).
    assert elapsed >= 0.55

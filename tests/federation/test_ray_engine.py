"""Flower's Ray simulation engine runs the same apps as the in-process engine, on loopback only."""

from __future__ import annotations

import ipaddress
import threading
from pathlib import Path

import pytest
import torch

from fedmed.workflows.simulate import materialize_sites, simulate

pytestmark = pytest.mark.slow


def _listening_sockets() -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket on this machine, from /proc/net."""
    found = set()
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        if not table.exists():
            continue
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                address, port = fields[1].split(":")
                found.add((_address(address), int(port, 16)))
    return found


def _address(hexadecimal: str) -> str:
    """/proc/net stores addresses as 32-bit words in host (little-endian) byte order."""
    raw = b"".join(bytes.fromhex(hexadecimal[i : i + 8])[::-1] for i in range(0, len(hexadecimal), 8))
    address = ipaddress.ip_address(raw)
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


def test_ray_and_inprocess_engines_agree_and_ray_stays_on_loopback(tiny_config) -> None:
    base = materialize_sites(tiny_config(model={"channels": [8, 16]}))
    before = _listening_sockets()
    seen: set[tuple[str, int]] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.5):
            seen.update(_listening_sockets() - before)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        ray_config = base.model_copy(deep=True)
        ray_config.engine.name = "ray"
        ray_run = simulate(ray_config)
    finally:
        stop.set()
        watcher.join()
    # Ray gives each site one CPU, so its actors run torch on one thread; match that here, since
    # a different thread count changes float summation order inside convolutions.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        inprocess_run = simulate(base)
    finally:
        torch.set_num_threads(threads)

    assert seen, "Ray opened no listening socket: the Ray engine did not run"
    assert {address for address, _ in seen} <= {"127.0.0.1", "::1"}, f"Ray listened beyond loopback: {seen}"

    ray_state = torch.load(ray_run.run_dir.checkpoints / "final.pt", weights_only=False)["state_dict"]
    local_state = torch.load(inprocess_run.run_dir.checkpoints / "final.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(ray_state[key], local_state[key]) for key in local_state), "engines disagree"
    assert _without_timings(ray_run.summary["sites"]) == _without_timings(inprocess_run.summary["sites"])


def _without_timings(document: object) -> object:
    """Wall-clock fields differ between any two runs; everything else must match."""
    if isinstance(document, dict):
        return {key: _without_timings(value) for key, value in document.items() if not key.endswith("_seconds")}
    return document

"""`fedmed simulate` phones nobody: no name lookup, connection, datagram or URL beyond loopback, and no
package installer started, watched from inside the process by a Python audit hook (PEP 578).

The hook sees every socket Python code opens (Flower's telemetry and update checks are Python: urllib
in a thread), in every thread, however short-lived. It does not see sockets opened by C libraries
(gRPC, Ray's core); the deployment test reads the kernel's socket tables for those.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomli_w

pytestmark = pytest.mark.integration

# Runs `fedmed simulate CONFIG` under the hook and writes what the hook saw to EVENTS.
DRIVER = """
import atexit, json, sys

events = []
NETWORK = {
    "socket.connect": 1, "socket.sendto": 1, "socket.sendmsg": 1,
    "socket.getaddrinfo": 0, "socket.gethostbyname": 0, "socket.gethostbyname_ex": 0,
    "socket.gethostbyaddr": 0, "socket.getnameinfo": 0, "urllib.Request": 0,
}

def hook(event, args):
    if event in NETWORK:
        events.append({"event": event, "target": repr(args[NETWORK[event]])})
    elif event == "subprocess.Popen":
        events.append({"event": event, "target": repr(args[1])})

sys.addaudithook(hook)
events_file, config = sys.argv[1:]
# At exit, after the interpreter has joined every worker thread: telemetry posts from a thread pool.
atexit.register(lambda: json.dump(events, open(events_file, "w")))
sys.argv = ["fedmed", "simulate", config]
from fedmed.cli.main import app

app()
"""

LOOPBACK = ("'127.0.0.1'", "'::1'", "'localhost'", "b'127.0.0.1'", "b'localhost'")
INSTALLERS = ("pip", "uv", "conda", "ensurepip")


def _config(tmp_path: Path, *, engine: str) -> Path:
    config: dict[str, Any] = {
        "name": f"offline-{engine}",
        "seed": 3,
        "output_dir": str(tmp_path / "runs"),
        "task": {"kind": "segmentation", "spatial_dims": 2, "image_size": [32, 32]},
        "model": {"channels": [8, 16]},
        "train": {"rounds": 1, "local_epochs": 1, "batch_size": 4},
        "evaluation": {"cross_site": False},
        "engine": {"name": engine},
        "synth": {
            "task": "segmentation",
            "spatial_dims": 2,
            "image_size": [32, 32],
            "train_cases": 4,
            "val_cases": 3,
            "seed": 1,
            "sites": [{"name": "site-a"}, {"name": "site-b", "intensity_scale": 2.0}],
        },
    }
    path = tmp_path / "offline.toml"
    path.write_text(tomli_w.dumps(config))
    return path


def _offending(event: dict[str, str]) -> bool:
    """Anything aimed beyond this machine, or a package installer being started."""
    name, target = event["event"], event["target"]
    if name == "subprocess.Popen":
        words = target.replace("[", " ").replace("]", " ").replace(",", " ").replace("'", " ").split()
        return any(Path(word).name in INSTALLERS for word in words) or "install" in words
    if name == "urllib.Request":
        return not target.startswith(("'http://127.0.0.1", "'https://127.0.0.1", "'http://localhost"))
    if target.startswith(("'/", "b'\\x00", "'\\x00")):  # a unix socket: a file on this machine
        return False
    if target == "None":  # getaddrinfo(None, port): this machine's own addresses, for binding
        return False
    return not target.lstrip("(").startswith(LOOPBACK)


def _simulate_under_audit(tmp_path: Path, *, engine: str) -> list[dict[str, str]]:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    events_file = tmp_path / "events.json"
    completed = subprocess.run(
        [sys.executable, str(driver), str(events_file), str(_config(tmp_path, engine=engine))],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert list((tmp_path / "runs").glob("*/checkpoints/final.pt")), "the simulation did not finish"
    return json.loads(events_file.read_text())


def test_inprocess_simulation_contacts_nothing_beyond_loopback(tmp_path: Path) -> None:
    events = _simulate_under_audit(tmp_path, engine="inprocess")
    assert not [event for event in events if _offending(event)], events


@pytest.mark.slow
def test_ray_simulation_contacts_nothing_beyond_loopback(tmp_path: Path) -> None:
    """Flower's simulation engine emits telemetry events (run start, run end): they must go nowhere."""
    events = _simulate_under_audit(tmp_path, engine="ray")
    assert any(event["event"] == "subprocess.Popen" for event in events), "the hook saw Ray start no process"
    assert not [event for event in events if _offending(event)], events


def test_the_audit_hook_sees_a_connection_attempt(tmp_path: Path) -> None:
    """The check above can fail: the same hook catches a lookup and a connection beyond loopback."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        DRIVER.split("sys.addaudithook(hook)")[0]
        + "sys.addaudithook(hook)\n"
        + "import socket\n"
        + "try:\n    socket.create_connection(('192.0.2.1', 443), timeout=0.01)\nexcept OSError:\n    pass\n"
        + "json.dump(events, open(sys.argv[1], 'w'))\n"
    )
    subprocess.run([sys.executable, str(probe), str(tmp_path / "events.json")], check=True, timeout=60)
    events = json.loads((tmp_path / "events.json").read_text())
    assert [event for event in events if _offending(event)], events

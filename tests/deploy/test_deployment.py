"""A real federation over TLS with node authentication: SuperLink, three SuperNodes, fedmed's
executors, all separate processes on 127.0.0.1."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import urllib.error
import urllib.request

import pytest
import torch
from deploy_helpers import run_config

from fedmed.config import load_site_config, run_config_from_dict
from fedmed.config.loader import read_toml
from fedmed.deploy.local import FEDMED, LocalFederation, cli, free_port, wait_for
from fedmed.flower.wire import LOCAL_BASELINE
from fedmed.site.audit import AuditLog, audit_path
from fedmed.workflows.simulate import simulate

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_deployed_run_matches_the_inprocess_engine(federation: LocalFederation) -> None:
    config_file = run_config(federation, "match", train={"rounds": 2})
    completed = federation.run(config_file, "--wait")
    assert "finished:completed" in completed.stdout
    run_dir = (
        federation.workspace
        / "server"
        / "runs"
        / completed.stdout.split("run directory: ")[1].split("/")[-1].split()[0]
    )
    deployed = torch.load(run_dir / "checkpoints" / "final.pt", weights_only=False)["state_dict"]

    raw = read_toml(config_file)
    raw["output_dir"] = str(federation.root / "simulated")
    raw["sites"] = [{"name": site, "path": str(federation.root / "data" / site)} for site in federation.sites]
    threads = torch.get_num_threads()
    torch.set_num_threads(read_toml(federation.site_config("a"))["daemon"]["torch_threads"])  # as the sites do
    try:
        simulated_run = simulate(run_config_from_dict(raw, base=federation.root))
    finally:
        torch.set_num_threads(threads)
    simulated = torch.load(simulated_run.run_dir.checkpoints / "final.pt", weights_only=False)["state_dict"]
    for key in simulated:
        assert torch.equal(deployed[key], simulated[key]), f"{key} differs between deployment and in-process"

    status = federation.status()
    assert {site["site"]: site["status"] for site in status["sites"]} == {"a": "online", "b": "online", "c": "online"}
    run = next(r for r in status["runs"] if r["run"] == run_dir.name)
    assert run["flower_status"] == "finished:completed" and run["rounds_done"] == 2
    assert set(run["last_metrics"]) == {"a", "b", "c"}
    assert run["state"] == "completed" and not any(m["stale"] for m in run["last_metrics"].values())

    # The same outputs as a simulation, and `fedmed report` takes the deployed run.
    for name in ("summary.json", "report.html", "plots/learning_curves.png"):
        assert (run_dir / name).exists() and (simulated_run.run_dir.path / name).exists(), name
    assert set(json.loads((run_dir / "summary.json").read_text())["sites"]) == {"a", "b", "c"}
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*")), "the ServerApp writes TensorBoard events"
    (run_dir / "report.html").unlink()
    assert "report:" in cli([FEDMED, "report", str(run_dir)]).stdout and (run_dir / "report.html").exists()


def test_one_broken_run_folder_does_not_break_status(federation: LocalFederation) -> None:
    broken = federation.workspace / "server" / "runs" / "broken-run"
    broken.mkdir()
    (broken / "config.toml").write_text("name = [unfinished")
    try:
        runs = {run["run"]: run for run in federation.status()["runs"]}
        text = cli([FEDMED, "status", "--server", str(federation.server_config)]).stdout
    finally:
        (broken / "config.toml").unlink()
        broken.rmdir()
    assert runs["broken-run"]["state"] == "broken" and "not valid TOML" in runs["broken-run"]["reason"]
    assert "broken-run" in text and "broken: " in text


def test_the_server_speaks_only_tls(federation: LocalFederation) -> None:
    with socket.create_connection(("127.0.0.1", federation.port), timeout=5) as plain:
        plain.sendall(b"GET / HTTP/1.0\r\n\r\n")
        # Plain HTTP gets only the front proxy's refusal, never an answer from the SuperLink.
        assert plain.recv(64).startswith(b"HTTP/1.1 400 Bad Request\r\nServer: nginx")
    # The system CAs do not vouch for it.
    with (
        socket.create_connection(("127.0.0.1", federation.port), timeout=5) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1")
    federation_ca = ssl.create_default_context(cafile=str(federation.site_config("a").parent / "ca.crt"))
    with (
        socket.create_connection(("127.0.0.1", federation.port), timeout=5) as raw,
        federation_ca.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_the_site_runtime_api_takes_tasks_only_from_its_executor(federation: LocalFederation) -> None:
    """A local process without the site's secret cannot take the ClientApp work (and its data access)."""
    port = read_toml(federation.site_config("a"))["daemon"]["runtime_port"]
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/runtime/acquire-task",
        data=b"",
        headers={"Content-Type": "application/protobuf"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    body = refused.value.read().decode(errors="replace")
    assert refused.value.code == 401, body
    assert "authentication failed" in body.lower()


def test_an_unregistered_node_is_refused(federation: LocalFederation) -> None:
    kit = federation.workspace / "sites" / "intruder"
    kit.mkdir()
    cli([FEDMED, "site", "keygen", str(kit / "keys"), "--name", "intruder"])
    site = read_toml(federation.site_config("a"))
    site.update(name="intruder", private_key=str(kit / "keys" / "intruder.key"), state_dir=str(kit / "state"))
    # Through the proxy with site a's certificate: the SuperLink's node authentication refuses the key.
    for key in ("client_certificate", "client_key"):
        site[key] = str(federation.site_config("a").parent / site[key])
    site["server"]["ca_certificate"] = str(federation.site_config("a").parent / "ca.crt")
    site["daemon"] = {"runtime_port": free_port(), "log_file": str(kit / "site.log")}
    import tomli_w

    (kit / "site.toml").write_text(tomli_w.dumps(site))
    nodes_before = {node["site"]: node["node_id"] for node in federation.status()["sites"]}
    output = kit / "daemon.out"
    daemon = subprocess.Popen(
        [FEDMED, "site", "start", str(kit / "site.toml")],
        stdout=output.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        # Refused, told why and what to do, and still trying: the coordinator may register the key later.
        wait_for(
            lambda: "does not know this site's key" in output.read_text(), timeout=180, what="the refusal's reason"
        )
        assert "fedmed server add-site" in output.read_text()
        assert daemon.poll() is None, "a refused site keeps trying instead of exiting"
        assert {node["site"]: node["node_id"] for node in federation.status()["sites"]} == nodes_before
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0


def test_a_site_refuses_an_app_it_has_not_approved(federation: LocalFederation) -> None:
    approved = read_toml(federation.site_config("c"))["approved_apps"]
    federation.edit_site("c", approved_apps=[])  # read again for every message: no restart needed
    try:
        config_file = run_config(federation, "refused", train={"rounds": 1}, strategy={"min_sites": 2})
        completed = federation.run(config_file, "--wait")
        assert "finished:completed" in completed.stdout
        log = federation.site_log("c").read_text()
        assert f"site c refused app {approved[0]}" in log
        assert f"fedmed site approve {federation.site_config('c')} {approved[0]}" in log
        run_dir = next((federation.workspace / "server" / "runs").glob("refused-*"))
        rounds = (run_dir / "rounds.jsonl").read_text().splitlines()
        assert '"sites_trained": ["a", "b"]' in rounds[0]
        # The refusal and its reason reach the round log, `fedmed status` and the report.
        assert f"site c refused app {approved[0]}" in json.loads(rounds[0])["sites_refused"]["c"]
        run = next(r for r in federation.status()["runs"] if r["run"] == run_dir.name)
        assert f"refused app {approved[0]}" in run["round_history"][0]["refused"]["c"]
        assert run["last_metrics"]["a"]["stale"] is False
        text = cli([FEDMED, "status", "--server", str(federation.server_config)]).stdout
        line = next((line for line in text.splitlines() if "refused by c:" in line), text)
        assert f"refused app {approved[0]}" in line, line
        page = (run_dir / "report.html").read_text()
        assert "<td>c: " in page and f"refused app {approved[0]}" in page
    finally:
        cli([FEDMED, "site", "approve", str(federation.site_config("c")), approved[0]])
    assert read_toml(federation.site_config("c"))["approved_apps"] == approved


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"data": "/nonexistent/fedmed-data"}, "data folder /nonexistent/fedmed-data does not exist"),
        ({"server": {"ca_certificate": "/nonexistent/ca.crt"}}, "/nonexistent/ca.crt: certificate file not found"),
        ({"colour": "blue"}, "unknown key 'colour'"),
    ],
    ids=["missing data", "missing CA", "unknown key"],
)
def test_bad_site_configs_are_refused_before_starting(
    federation: LocalFederation, change: dict, message: str, tmp_path
) -> None:
    import tomli_w

    site = read_toml(federation.site_config("a"))
    for key, value in change.items():
        site[key] = {**site.get(key, {}), **value} if isinstance(value, dict) else value
    for key in ("private_key", "client_certificate", "client_key"):
        site[key] = str(federation.site_config("a").parent / site[key])
    if "server" not in change:
        site["server"]["ca_certificate"] = str(federation.site_config("a").parent / "ca.crt")
    bad = tmp_path / "site.toml"
    bad.write_text(tomli_w.dumps(site))
    completed = cli([FEDMED, "site", "start", str(bad)], check=False)
    assert completed.returncode == 2
    assert message in completed.stderr and "Traceback" not in completed.stderr


def test_a_site_trusting_another_ca_refuses_the_server(federation: LocalFederation, tmp_path) -> None:
    import tomli_w

    cli([FEDMED, "provision", str(tmp_path / "other"), "--federation", "other"])
    site = read_toml(federation.site_config("a"))
    for key in ("private_key", "client_certificate", "client_key"):
        site[key] = str(federation.site_config("a").parent / site[key])
    site["server"]["ca_certificate"] = str(tmp_path / "other" / "ca" / "ca.crt")
    bad = tmp_path / "site.toml"
    bad.write_text(tomli_w.dumps(site))
    completed = cli([FEDMED, "site", "start", str(bad)], check=False)
    assert completed.returncode == 2
    assert "presented a certificate that" in completed.stderr and "does not accept" in completed.stderr


def test_deployed_harmonization_personalization_and_cross_site_evaluation(federation: LocalFederation) -> None:
    """Nyúl landmarks reach every site's own state; only a site whose policy allows it lends its personalized model.
    Each site trains its local-only baseline if its policy allows, and reports only the metrics its policy shares."""
    federation.edit_site("a", privacy={"share_personalized_model": True, "share_local_baseline": ["dice"]})
    federation.edit_site("b", privacy={"train_local_baseline": False})
    try:
        config_file = run_config(
            federation,
            "drift",
            train={"rounds": 1},
            task={"intensity": "nyul"},
            strategy={"fedbn": True, "round_timeout_s": 60},
            evaluation={"local_baseline": True},
        )
        completed = federation.run(config_file, "--wait")
    finally:
        federation.edit_site("a", privacy={"share_personalized_model": False, "share_local_baseline": []})
        federation.edit_site("b", privacy={"train_local_baseline": True})
    assert "finished:completed" in completed.stdout, completed.stdout
    run_name = completed.stdout.split("run directory: ")[1].split()[0].rstrip("/").split("/")[-1]
    run_dir = federation.workspace / "server" / "runs" / run_name

    normalization = json.loads((run_dir / "normalization.json").read_text())
    assert set(normalization["sites"]) == {"a", "b", "c"}
    for site in ("a", "b", "c"):
        state_dir = load_site_config(federation.site_config(site)).state_dir / "runs" / run_name
        state = json.loads((state_dir / "normalization.json").read_text())
        assert state["standard_landmarks"] == normalization["standard_landmarks"]
        assert (state_dir / "personalized_model.pt").exists()

    final = json.loads((run_dir / "cross_site.json").read_text())["evaluations"][-1]
    assert set(final["metrics"]["global"]) == {"a", "b", "c"}
    assert set(final["metrics"]["personalized:a"]) == {"a", "b", "c"}  # a lends its model
    assert set(final["metrics"]["personalized:b"]) == {"b"}  # b's layers never left b
    assert set(final["metrics"]["personalized:c"]) == {"c"}

    # a shares its local-only Dice and nothing else; c trains one and keeps every value; b's policy refuses to train.
    comparisons = {
        site: json.loads(
            (
                load_site_config(federation.site_config(site)).state_dir / "runs" / run_name / "comparison.json"
            ).read_text()
        )
        for site in ("a", "b", "c")
    }
    assert comparisons["b"]["local_only"] is None
    for site in ("a", "c"):
        assert {"dice", "num-examples"} <= set(comparisons[site]["local_only"]), site
        assert comparisons[site]["answer"].startswith("federation "), site
    assert final["metrics"]["local-only:a"] == {"a": {"dice": comparisons["a"]["local_only"]["dice"]}}
    assert "local-only:b" not in final["metrics"] and "local-only:c" not in final["metrics"]
    # What left each site, by its own audit log: a's Dice alone, nothing of c's or b's local-only model.
    for site, expected in (("a", {"dice"}), ("b", None), ("c", None)):
        log = AuditLog(audit_path(load_site_config(federation.site_config(site)).state_dir))
        sent = [record.get("metrics") for record in log.records() if record["event"] == "message-sent"]
        baselines = [set(records[LOCAL_BASELINE]) for records in sent if LOCAL_BASELINE in (records or {})]
        assert baselines == ([expected] if expected else []), site
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sites"]["a"]["local_only"] == {"dice": comparisons["a"]["local_only"]["dice"]}
    assert summary["sites"]["b"]["local_only"] is None and summary["sites"]["c"]["local_only"] is None
    assert set(summary["gain_over_local_only"]) == {"a"}

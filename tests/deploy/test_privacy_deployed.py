"""Privacy in a real federation (TLS SuperLink, one SuperNode per site, separate processes):
DP-SGD charged to each site's own ledger under SecAgg+, and a site refusing runs its policy forbids."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from deploy_helpers import run_config

from fedmed.config import load_site_config
from fedmed.deploy.local import FEDMED, LocalFederation, cli
from fedmed.privacy import PrivacyLedger
from fedmed.site.audit import AuditLog, audit_path
from fedmed.site.privacy import ledger_path

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _run_dir(output: str) -> Path:
    return Path(re.search(r"run directory: (\S+)", output).group(1))


def _ledger(federation: LocalFederation, site: str) -> Path:
    return ledger_path(load_site_config(federation.site_config(site)).state_dir)


@pytest.fixture(scope="module")
def private_run(federation: LocalFederation) -> Path:
    """A 2-round DP-SGD run under SecAgg+ and FedBN: every site's ledger holds its spend afterwards."""
    config = run_config(
        federation,
        "private",
        train={"rounds": 2},
        dp_sgd={"enabled": True, "epsilon": 4.0, "accountant": "rdp"},
        secagg={"enabled": True},
        strategy={"fedbn": True, "round_timeout_s": 60},
    )
    return _run_dir(federation.run(config, "--wait").stdout)


def test_dp_sgd_with_secure_aggregation_charges_each_sites_own_ledger(
    federation: LocalFederation, private_run: Path
) -> None:
    run_dir = private_run
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [row["secagg_sites"] for row in rounds] == [["a", "b", "c"]] * 2
    assert all(row["secagg_max_quantization_error"] < 1e-4 for row in rounds)
    train = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in train if row["phase"] == "train"]
    assert all("num-examples" not in row for row in train), "under SecAgg a site's weight stays hidden"
    for site in ("a", "b", "c"):
        with PrivacyLedger(_ledger(federation, site)) as ledger:
            spent = ledger.spent(site, delta=1e-5, accountant="prv")  # the site's policy picks the accountant
            assert len(ledger.history(site)) == 2
        assert 3.5 < spent <= 4.0
        assert [row["epsilon"] for row in train if row["site"] == site][-1] == pytest.approx(spent)
        shown = cli([FEDMED, "site", "budget", str(federation.site_config(site))])
        assert "Warning" not in shown.stderr, shown.stderr  # Opacus' accountant warnings stay out of the admin's view
        budget = shown.stdout
        assert re.search(rf"^{site}\s+{spent:.3f}\s+8\.000\s+{8 - spent:.3f}", budget, re.MULTILINE), budget
    assert not any(run_dir.glob("**/privacy-ledger.sqlite")), "ledgers live at the sites, never with the coordinator"
    for site in ("a", "b", "c"):
        # The site's audit log: under SecAgg+ only masked updates left, each after its round's charge.
        records = AuditLog(audit_path(load_site_config(federation.site_config(site)).state_dir)).records()
        sent = [r for r in records if r["event"] == "message-sent" and r["run_id"] == run_dir.name]
        masked = [r for r in sent if r["kind"] == "secagg-masked-update"]
        assert [r["round"] for r in masked] == [1, 2]
        assert not [r for r in sent if r["kind"] in ("model-update", "refusal")]
        assert {"secagg-public-keys", "secagg-key-shares", "secagg-unmask-shares"} <= {r["kind"] for r in sent}
        epsilons = [row["epsilon"] for row in train if row["site"] == site]
        assert [r["metrics"]["metrics"]["epsilon"] for r in masked] == pytest.approx(epsilons)
        charged = [r for r in records if r["event"] == "ledger-charged" and r.get("run_id") == run_dir.name]
        assert [r["round"] for r in charged] == [1, 2]
        assert all(records.index(c) < records.index(m) for c, m in zip(charged, masked, strict=True))


def test_a_deployed_site_refuses_runs_its_policy_forbids(federation: LocalFederation, private_run: Path) -> None:
    federation.edit_site("c", privacy={"epsilon": 1.0})  # below what c has spent
    federation.edit_site("b", privacy={"require_dp": True})
    try:
        private = run_config(
            federation,
            "over-budget",
            train={"rounds": 1},
            dp_sgd={"enabled": True, "epsilon": 4.0, "accountant": "rdp"},
            strategy={"min_sites": 3, "round_timeout_s": 60},
        )
        refused = federation.run(private, "--wait", check=False)
        assert refused.returncode == 1
        assert re.search(r"site c: privacy budget exhausted \(ε \d\.\d\d spent of 1\.00\)", refused.stdout), (
            refused.stdout
        )

        without_dp = run_config(
            federation, "no-dp", train={"rounds": 1}, strategy={"min_sites": 2, "round_timeout_s": 60}
        )
        run_dir = _run_dir(federation.run(without_dp, "--wait").stdout)
        first = json.loads((run_dir / "rounds.jsonl").read_text().splitlines()[0])
        assert first["sites_trained"] == ["a", "c"], "b requires DP and sits this run out"
        assert "site b: refusing to train without DP-SGD" in federation.site_log("b").read_text()
    finally:
        federation.edit_site("c", privacy={"epsilon": 8.0})
        federation.edit_site("b", privacy={"require_dp": False})
    with PrivacyLedger(_ledger(federation, "c")) as ledger:
        assert len(ledger.history("c")) == 2, "the refused round was not charged"

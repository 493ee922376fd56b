"""The model card at the end of a run: temperature scaling and the OOD reference fitted across the sites from sums
and counts, with nothing but statistics leaving a site."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest

from fedmed.flower.engines.inprocess import InProcessGrid
from fedmed.flower.records import sender
from fedmed.runs.model_card import ALL_SITES, MODEL_CARD_FILE, read_model_card
from fedmed.site.audit import AuditLog
from fedmed.site.model_card import ModelCardRefusedError, calibration_statistics, reference_statistics
from fedmed.site.privacy import SitePrivacyTerms, ledger_path, simulated_policy
from fedmed.site.session import SiteSession, SiteSpec
from fedmed.workflows.simulate import materialize_sites, simulate

SITES = [{"name": "site-a"}, {"name": "site-b", "intensity_scale": 2.0, "intensity_offset": 10.0}]
CARD_MESSAGES = {"query.model_card_reference", "query.model_card_calibrate"}


def test_the_model_card_is_fitted_from_statistics_only(tiny_config) -> None:
    config = tiny_config(
        "classification",
        2,
        train={"rounds": 2},
        synth={"sites": SITES, "train_cases": 6, "val_cases": 6},
        evaluation={"cross_site": False},
    )
    run = simulate(config)
    assert (run.run_dir.path / MODEL_CARD_FILE).is_file()
    card = read_model_card(run.run_dir.path)
    assert card is not None
    assert card.temperature is not None and 0.25 <= card.temperature <= 8.0
    # densenet-small's deepest feature map: one value per channel of its last block
    assert card.ood_mean is not None and card.ood_var is not None
    assert len(card.ood_mean) == len(card.ood_var) > 1
    assert all(value >= 0 for value in card.ood_var)
    assert card.ood_threshold is not None and math.isfinite(card.ood_threshold) and card.ood_threshold > 0
    for site in ("site-a", "site-b", ALL_SITES):
        entry = card.calibration[site]
        assert entry["cases"] == (12 if site == ALL_SITES else 6), "every validation case, cross-fitted"
        assert 0.0 <= entry["ece_before"] <= 1.0 and 0.0 <= entry["ece_after"] <= 1.0
        assert sum(entry["bins_before"]["count"]) == sum(entry["bins_after"]["count"]) == entry["cases"]
    report = (run.run_dir.path / "report.html").read_text()
    assert "Calibration" in report and "ECE" in report and "OOD threshold" in report

    for site in ("site-a", "site-b"):
        log = AuditLog(run.run_dir.path / "sites" / site / "audit.jsonl")
        assert log.verify().ok
        sent = [record for record in log.records() if record["event"] == "message-sent"]
        card_replies = [record for record in sent if record["message_type"] in CARD_MESSAGES]
        assert Counter(record["message_type"] for record in card_replies) == Counter(CARD_MESSAGES)
        for record in card_replies:
            assert record["kind"] == "model-card-statistics"
            assert record["array_bytes"] == 0, "statistics travel as numbers, never as arrays of cases or a model"
            assert record["records"] == ["model-card", "site"]
            statistics = record["metrics"]["model-card"]
            if record["message_type"] == "query.model_card_reference":
                assert set(statistics) == {
                    "nll",
                    "nll-count",
                    "feature-sum",
                    "feature-sumsq",
                    "feature-count",
                    "feature-groups",
                }
                assert statistics["feature-count"] == 6 and statistics["nll-count"] == [3, 3], "two folds"
                assert len(statistics["nll"]) == 2 * 41
            else:
                assert set(statistics) == {"assessed-cases", "bins-before", "bins-after", "ood-counts"}
                assert sum(statistics["ood-counts"]) == 6
        print(site, json.dumps(Counter(record["kind"] for record in sent)))


def test_a_private_run_skips_the_model_card_and_says_why(tiny_config) -> None:
    config = tiny_config(
        "classification",
        2,
        train={"rounds": 1},
        synth={"sites": SITES},
        evaluation={"cross_site": False},
        client_dp={"enabled": True, "noise_multiplier": 0.1},
    )
    run = simulate(config)
    card = read_model_card(run.run_dir.path)
    assert card is not None and card.temperature is None and card.ood_mean is None
    assert any("client-level DP" in note and "not privacy-protected" in note for note in card.notes)
    for site in ("site-a", "site-b"):
        sent = AuditLog(run.run_dir.path / "sites" / site / "audit.jsonl").records()
        assert not [record for record in sent if record.get("kind") == "model-card-statistics"]


def test_the_model_card_can_be_switched_off(tiny_config) -> None:
    config = tiny_config(
        "classification",
        2,
        train={"rounds": 1},
        synth={"sites": SITES},
        evaluation={"cross_site": False, "model_card": False},
    )
    run = simulate(config)
    assert not (run.run_dir.path / MODEL_CARD_FILE).exists()


def test_a_site_that_vanishes_is_left_out_of_the_card_and_named(tiny_config, monkeypatch: pytest.MonkeyPatch) -> None:
    """site-b does its work for the calibrate exchange but its reply never reaches the server."""
    original = InProcessGrid.send_and_receive

    def lossy(self, messages, *, timeout=None):
        replies = list(original(self, messages, timeout=timeout))
        return [
            reply
            for reply in replies
            if not (reply.metadata.message_type == "query.model_card_calibrate" and sender(reply) == "site-b")
        ]

    monkeypatch.setattr(InProcessGrid, "send_and_receive", lossy)
    config = tiny_config(
        "classification", 2, train={"rounds": 1}, synth={"sites": SITES}, evaluation={"cross_site": False}
    )
    card = read_model_card(simulate(config).run_dir.path)
    assert card is not None and card.temperature is not None, "the reference exchange heard from both sites"
    assert set(card.calibration) == {"site-a", ALL_SITES}
    assert card.calibration[ALL_SITES]["cases"] == card.calibration["site-a"]["cases"] == 3
    assert any(note.startswith("model_card_calibrate: site site-b left out") for note in card.notes), card.notes
    assert card.ood_threshold is not None, "from site-a's validation cases"


def test_a_site_refuses_model_card_statistics_in_a_private_run_whatever_the_coordinator_asks(
    tiny_config, tmp_path: Path
) -> None:
    """The coordinator skips the card in private runs; one that asks anyway (modified, or hostile) gets a refusal
    from the site itself, before any case is read."""
    config = materialize_sites(
        tiny_config("classification", 2, synth={"sites": SITES}, dp_sgd={"enabled": True, "epsilon": 5.0})
    )
    site = config.sites[0]
    spec = SiteSpec(
        name=site.name,
        data_path=site.path,
        state_dir=tmp_path / "state",
        run_id="run-1",
        privacy=SitePrivacyTerms(ledger_path=ledger_path(tmp_path / "state"), policy=simulated_policy(config)),
    )
    session = SiteSession(spec, config)
    state = session.shared_template()
    with pytest.raises(ModelCardRefusedError, match="not privacy-protected"):
        reference_statistics(session, state)
    with pytest.raises(ModelCardRefusedError, match="not privacy-protected"):
        calibration_statistics(session, state, fold_temperatures=[1.0, 1.0], reference=None)
    assert not ledger_path(tmp_path / "state").exists(), "nothing was charged to the site's ledger"

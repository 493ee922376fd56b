"""What a site keeps of its own (optimizer state, Ditto's personal model) and the model it delivers."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fedmed.core.errors import ConfigError
from fedmed.site.audit import AuditLog
from fedmed.site.local_layers import (
    DELIVERED_FILE,
    DITTO_FILE,
    DITTO_OPTIMIZER_FILE,
    OPTIMIZER_FILE,
    SiteStateFileError,
)
from fedmed.site.session import SiteSession, SiteSpec
from fedmed.workflows.simulate import materialize_sites, simulate


def _session(config, site, state_dir: Path, *, data_path: Path | None = None) -> SiteSession:
    return SiteSession(SiteSpec(name=site.name, data_path=data_path or site.path, state_dir=state_dir), config)


def _close(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> bool:
    return left.keys() == right.keys() and all(torch.allclose(left[key], right[key], atol=1e-6) for key in left)


def test_optimizer_state_and_ditto_model_survive_a_restart_and_only_the_shared_update_leaves(
    tiny_config, tmp_path
) -> None:
    config = tiny_config(train={"keep_optimizer_state": True}, evaluation={"ditto_lambda": 0.5})
    site = materialize_sites(config).sites[0]
    running = _session(config, site, tmp_path / "running")
    start = {key: value.clone() for key, value in running.shared_template().items()}
    first, metrics = running.train(start, server_round=1, proximal_mu=0.0)
    first = {key: value.clone() for key, value in first.items()}  # as received: the site's model trains on
    assert first.keys() == start.keys(), "the update holds the shared weights and nothing else"
    assert all(isinstance(value, float | int) for value in metrics.values())
    for kept in (OPTIMIZER_FILE, DITTO_FILE, DITTO_OPTIMIZER_FILE):
        assert (tmp_path / "running" / kept).exists(), kept
    # A restart between the rounds: a fresh session (a new ClientApp process) on the state folder as round 1 left it.
    shutil.copytree(tmp_path / "running", tmp_path / "restarted")
    shutil.copytree(tmp_path / "running", tmp_path / "forgot-optimizer")
    (tmp_path / "forgot-optimizer" / OPTIMIZER_FILE).unlink()

    second, _ = running.train(first, server_round=2, proximal_mu=0.0)
    restarted = _session(config, site, tmp_path / "restarted")
    assert _close(restarted.train(first, server_round=2, proximal_mu=0.0)[0], second)
    ditto = torch.load(tmp_path / "running" / DITTO_FILE, weights_only=True)
    assert _close(torch.load(tmp_path / "restarted" / DITTO_FILE, weights_only=True), ditto)
    # The kept state is what round 2 started from: without it round 2 ends elsewhere.
    forgot = _session(config, site, tmp_path / "forgot-optimizer")
    assert not _close(forgot.train(first, server_round=2, proximal_mu=0.0)[0], second)
    # Ditto's personal model is its own: it is neither the update nor lent at the end of the run.
    assert not _close({key: ditto[key] for key in second}, second)
    assert not running.lends_personalized_model(final=True)
    # A kept file damaged on disk (a full disk truncated it) is refused by name, with the fix.
    (tmp_path / "running" / OPTIMIZER_FILE).write_bytes(b"truncated")
    with pytest.raises(SiteStateFileError, match=rf"{OPTIMIZER_FILE} cannot be read .* move it aside"):
        running.train(second, server_round=3, proximal_mu=0.0)


def _invert_validation_labels(site_dir: Path) -> None:
    manifest = json.loads((site_dir / "dataset.json").read_text())
    for case in manifest["validation"]:
        path = site_dir / case["label"]
        label = nib.load(path)
        inverted = 1 - np.asarray(label.dataobj)
        nib.save(nib.Nifti1Image(inverted.astype(np.uint8), label.affine), path)


@pytest.mark.parametrize(("cross_validate_below", "personal", "tuning"), [(0, 3, 1), (5, 4, None)])
def test_the_delivered_model_is_chosen_on_training_cases_never_on_validation_labels(
    tiny_config, tmp_path, cross_validate_below: int, personal: int, tuning: int | None
) -> None:
    """A tuning split of 1 case of 4, or (the default for a site this small) leave-one-out over all 4."""
    config = tiny_config(
        evaluation={"finetune_epochs": 3, "tuning_fraction": 0.25, "cross_validate_below": cross_validate_below}
    )
    site = materialize_sites(config).sites[0]
    relabelled = tmp_path / "relabelled"
    shutil.copytree(site.path, relabelled)
    _invert_validation_labels(relabelled)
    results, start = {}, None
    for name, path in (("original", site.path), ("relabelled", relabelled)):
        session = _session(config, site, tmp_path / f"state-{name}", data_path=path)
        assert len(session.personal_training_cases) == personal
        assert (session.tuning_cases and len(session.tuning_cases)) == tuning
        assert len(session.training_cases) == 4  # the federation trains on every training case
        start = start or {key: value.clone() for key, value in session.shared_template().items()}
        trained, _ = session.train(start, server_round=1, proximal_mu=0.0)
        results[name] = session.personalize(trained, server_round=1, final=True)[1]
    original, relabelled_metrics = results["original"], results["relabelled"]
    assert original["dice"] != pytest.approx(relabelled_metrics["dice"]), "the validation labels changed the score"
    for key in ("tuning_dice_global", "tuning_dice_personalized", "delivered_personalized", "finetune_best_epoch"):
        assert original[key] == relabelled_metrics[key], key
    assert original["tuning_cases"] == (tuning or 4)
    assert original.get("choice_folds") == (None if tuning else 4)


def test_ditto_runs_under_secure_aggregation_and_its_personal_model_never_leaves(tiny_config) -> None:
    config = tiny_config(
        train={"rounds": 2, "keep_optimizer_state": True},
        evaluation={"ditto_lambda": 0.1, "tuning_fraction": 0.25},
        secagg={"enabled": True},
    )
    result = simulate(config)
    summary = result.summary
    for site, row in summary["sites"].items():
        assert row["delivered_model"] in ("global", "personalized")
        home = row["personalized"]
        assert row["delivered_model"] == ("personalized" if home["delivered_personalized"] else "global")
        sent = [
            r for r in AuditLog(result.run_dir.site_dir(site) / "audit.jsonl").records() if r["event"] == "message-sent"
        ]
        kinds = Counter(record["kind"] for record in sent)
        assert "personalized-model" not in kinds, kinds
    final = result.run_dir.read_json("cross_site.json")["evaluations"][-1]
    for site in summary["sites"]:  # scored at home only: no other site ever received it
        assert set(final["metrics"][f"personalized:{site}"]) == {site}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"dp_sgd": {"enabled": True}, "evaluation": {"ditto_lambda": 0.1}}, "ditto_lambda must be 0 with dp_sgd"),
        ({"dp_sgd": {"enabled": True}, "train": {"local_steps": 4}}, "local_steps must be unset with dp_sgd"),
    ],
)
def test_personal_training_that_dp_sgd_cannot_account_for_is_refused(tiny_config, changes, message) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_config(**changes)


def test_each_site_trains_its_local_baseline_and_the_summary_leads_with_the_answer(tiny_config) -> None:
    config = tiny_config(evaluation={"local_baseline": True, "finetune_epochs": 2})
    result = simulate(config)
    summary = result.summary
    for site, row in summary["sites"].items():
        comparison = json.loads((result.run_dir.site_dir(site) / "comparison.json").read_text())
        assert row["local_only"]["dice"] == comparison["local_only"]["dice"]  # a simulation's sites share it all
        assert comparison["delivered_model"] == row["delivered_model"]
        delivered = row["delivered"]["dice"]
        assert summary["gain_over_local_only"][site] == pytest.approx(delivered - comparison["local_only"]["dice"])
        assert (result.run_dir.site_dir(site) / "local_only_model.pt").exists()
    # The printed summary leads with each site's answer.
    first_lines = result.table().splitlines()[: len(summary["sites"])]
    assert all(line.split()[1] == "federation" for line in first_lines), first_lines


def test_the_local_baselines_of_the_simulation_and_of_the_sites_are_not_both_asked_for(tiny_config) -> None:
    with pytest.raises(ConfigError, match="keep one"):
        tiny_config(evaluation={"local_baseline": True}, baselines={"local_only": True})


def test_a_small_sites_fine_tune_that_hurts_every_fold_is_never_delivered(tiny_config, tmp_path) -> None:
    """Leave-one-out over the site's 4 training cases: a fine-tune at a learning rate that wrecks the model loses to
    the global model on the held-out cases, so the site is delivered the global model, untouched."""
    config = tiny_config(evaluation={"finetune_epochs": 5}, train={"local_epochs": 60})
    site = materialize_sites(config).sites[0]
    trained, _ = _session(config, site, tmp_path / "train").train(
        _session(config, site, tmp_path / "start").shared_template(), server_round=1, proximal_mu=0.0
    )
    trained = {key: value.clone() for key, value in trained.items()}
    wrecking = _session(
        tiny_config(evaluation={"finetune_epochs": 5}, train={"learning_rate": 1000.0}), site, tmp_path / "wrecking"
    )
    personal, metrics = wrecking.personalize(trained, server_round=2, final=True)
    assert metrics["choice_folds"] == 4 and metrics["tuning_cases"] == 4
    assert metrics["finetune_best_epoch"] == 0 and metrics["finetune_epochs_run"] == 2  # patience: 2 epochs
    assert metrics["delivered_personalized"] == 0.0
    assert _close({key: personal[key] for key in trained}, trained)


def test_a_small_sites_fine_tune_that_helps_is_refitted_on_every_training_case(tiny_config, tmp_path) -> None:
    """From an untrained model, fine-tuning helps the held-out cases: the folds choose a length, and the delivered
    model is that many epochs on all 4 cases (not on any fold's 3)."""
    config = tiny_config(evaluation={"finetune_epochs": 4})
    site = materialize_sites(config).sites[0]
    session = _session(config, site, tmp_path / "state")
    assert session.tuning_cases is None and len(session.personal_training_cases) == 4
    start = {key: value.clone() for key, value in session.shared_template().items()}
    personal, metrics = session.personalize(start, server_round=1, final=True)
    assert metrics["tuning_dice_personalized"] > metrics["tuning_dice_global"]
    assert metrics["finetune_best_epoch"] >= 1 and metrics["delivered_personalized"] == 1.0
    delivered = torch.load(tmp_path / "state" / DELIVERED_FILE, weights_only=True)
    assert _close({key: delivered[key] for key in personal}, personal)
    assert not _close({key: personal[key] for key in start}, start)


def test_a_site_with_one_training_case_is_delivered_the_global_model_and_told_why(
    tiny_config, tmp_path, caplog
) -> None:
    config = tiny_config(synth={"train_cases": 1}, evaluation={"finetune_epochs": 3})
    site = materialize_sites(config).sites[0]
    session = _session(config, site, tmp_path / "state")
    start = {key: value.clone() for key, value in session.shared_template().items()}
    personal, metrics = session.personalize(start, server_round=1, final=True)
    assert metrics["delivered_personalized"] == 0.0 and metrics["tuning_cases"] == 0
    assert _close({key: personal[key] for key in start}, start)
    assert "1 training case, none to spare to judge a fine-tune by" in caplog.text

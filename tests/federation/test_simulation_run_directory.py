"""A simulated federation writes everything a researcher needs, and the numbers are consistent."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import torch

from fedmed.data import load_site
from fedmed.models import build_model, site_local_keys
from fedmed.tasks import get_task, select_device
from fedmed.workflows.simulate import simulate


def test_run_directory_is_complete_and_consistent(tiny_config) -> None:
    config = tiny_config(baselines={"local_only": True, "pooled": True})
    result = simulate(config)
    run = result.run_dir

    assert (run.path / "config.toml").read_text().count("[[sites]]") == 3
    rows = run.read_metrics()
    assert sorted((r["round"], r["phase"]) for r in rows) == sorted(
        [(r, p) for r in (1, 2) for p in ("train", "evaluate") for _ in range(3)]
    )
    with run.metrics_csv.open() as handle:
        header = next(csv.reader(handle))
    assert {"round", "site", "phase", "dice", "hd95", "train_loss", "num-examples"} <= set(header)

    # The saved final model, evaluated again at each site, gives the logged last-round Dice.
    checkpoint = torch.load(run.checkpoints / "final.pt", weights_only=False)
    model = build_model(config.task, config.model)
    model.load_state_dict(checkpoint["state_dict"])
    task = get_task(config.task)
    for site in result.summary["sites"]:
        data = load_site(run.path.parent / "data" / _synth_folder(run) / site, task=config.task)
        dice = task.evaluate(model, data.val, device=select_device("cpu"))["dice"]
        assert dice == pytest.approx(result.summary["sites"][site]["federated"]["dice"], abs=1e-5)

    summary = result.summary
    assert set(summary["sites"]) == {"site-a", "site-b", "site-c"}
    for row in summary["sites"].values():
        assert {"federated", "local_only", "pooled"} <= set(row)
        assert 0.0 <= row["local_only"]["dice"] <= 1.0

    page = run.report_html.read_text()
    images = re.findall(r'src="(plots/[^"]+)"', page)
    assert {Path(image).stem for image in images} == {
        "learning_curves",
        "train_loss",
        "final_by_site",
        "cross_site",
        "intensity_histograms",
        "reliability",  # the model card's, pooled over the sites
        "contribution_scores",  # each site's outlier score over the rounds
    }
    assert all((run.path / image).stat().st_size > 1000 for image in images)
    assert "hospital" not in page and "site-b" in page
    assert "worst site" in result.table()


def _synth_folder(run) -> str:
    return next(p.name for p in (run.path.parent / "data").iterdir())


def test_same_seed_gives_identical_models(tiny_config) -> None:
    states = []
    for _ in range(2):
        run = simulate(tiny_config()).run_dir
        states.append(torch.load(run.checkpoints / "final.pt", weights_only=False)["state_dict"])
    assert all(torch.equal(states[0][key], states[1][key]) for key in states[0])


def test_fedbn_keeps_normalization_at_the_sites(tiny_config) -> None:
    config = tiny_config(strategy={"fedbn": True})
    run = simulate(config).run_dir
    torch.manual_seed(config.seed)
    initial = build_model(config.task, config.model).state_dict()
    local_keys = site_local_keys(build_model(config.task, config.model))
    final = torch.load(run.checkpoints / "final.pt", weights_only=False)
    assert final["site_local_keys"] == local_keys
    # Never aggregated: the server's copy of every normalization parameter is still the initial one.
    assert all(torch.equal(final["state_dict"][key], initial[key]) for key in local_keys)
    assert not all(torch.equal(final["state_dict"][key], initial[key]) for key in final["state_dict"])

    site_states = {site: torch.load(run.site_dir(site) / "local_parameters.pt") for site in config.site_names}
    for state in site_states.values():
        assert sorted(state) == sorted(local_keys)
    a, b = site_states["site-a"], site_states["site-b"]
    assert any(not torch.equal(a[key], b[key]) for key in local_keys), "each site trains its own normalization"
    assert any(not torch.equal(a[key], initial[key]) for key in local_keys)


def test_fedprox_pulls_sites_towards_the_global_model(tiny_config) -> None:
    movement = {}
    for name, mu in (("fedavg", 0.0), ("fedprox", 50.0)):
        config = tiny_config(strategy={"name": name, "proximal_mu": mu}, train={"rounds": 1, "local_epochs": 3})
        run = simulate(config).run_dir
        torch.manual_seed(config.seed)
        initial = build_model(config.task, config.model).state_dict()
        final = torch.load(run.checkpoints / "final.pt", weights_only=False)["state_dict"]
        movement[name] = sum(float((final[k].float() - initial[k].float()).pow(2).sum()) for k in initial)
    assert movement["fedprox"] < 0.5 * movement["fedavg"]


def test_fedadam_runs_and_checkpoints_its_moments(tiny_config) -> None:
    run = simulate(tiny_config(strategy={"name": "fedadam", "server_learning_rate": 0.01})).run_dir
    latest = torch.load(run.checkpoints / "latest.pt", weights_only=False)
    assert latest["round"] == 2
    assert set(latest["strategy_state"]) == {"m_t", "v_t"}
    assert latest["strategy_state"]["v_t"]


def test_progress_is_logged_per_round(tiny_config, caplog) -> None:
    caplog.set_level("INFO", logger="fedmed")
    simulate(tiny_config())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("round ")]
    assert len(lines) == 2
    assert lines[0].startswith("round 1/2  dice mean ") and "site-a 0." in lines[0] and "ETA" in lines[0]

"""Drift handling end to end: site-level normalization, Nyúl harmonization, personalization, cross-site evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedmed.core.errors import ConfigError
from fedmed.data.normalization import average_landmarks, foreground_mask
from fedmed.site.normalization import NormalizationStateError
from fedmed.site.session import SiteSession, SiteSpec
from fedmed.workflows.simulate import SimulationResult, materialize_sites, simulate

# Two scanners whose intensities differ by scale, offset and a non-linear response.
DRIFTED = [{"name": "site-a"}, {"name": "site-b", "intensity_scale": 3.0, "intensity_offset": 50.0, "gamma": 0.6}]


def _foreground_quantiles(session: SiteSession, *, raw: bool) -> np.ndarray:
    data = session.raw_data if raw else session.data
    values = [
        sample["image"][foreground_mask(raw_sample["image"], rule="mean")].numpy()
        for sample, raw_sample in zip(data.train, session.raw_data.train)
    ]
    return np.quantile(np.concatenate(values), [0.1, 0.5, 0.9])


def _sessions(result: SimulationResult) -> dict[str, SiteSession]:
    """Each site as it trained: its data and its normalization state from the run."""
    return {
        site.name: SiteSession(
            SiteSpec(name=site.name, data_path=site.path, state_dir=result.run_dir.site_dir(site.name)), result.config
        )
        for site in result.config.sites
    }


def test_nyul_harmonization_shares_only_landmarks_and_aligns_the_sites(tiny_config) -> None:
    config = tiny_config(
        task={"intensity": "nyul"}, synth={"sites": DRIFTED}, train={"rounds": 1}, evaluation={"cross_site": False}
    )
    result = simulate(config)
    recorded = result.run_dir.read_json("normalization.json")
    sites = recorded["sites"]
    assert set(sites) == {"site-a", "site-b"}
    # What reached the coordinator: image counts, landmark vectors and 48-bin histograms, nothing image-sized.
    for summary in sites.values():
        assert set(summary) == {"num_images", "landmarks", "before", "after"}
        assert len(summary["landmarks"]) == len(config.normalization.landmarks)
        assert len(summary["before"]["counts"]) == len(summary["after"]["counts"]) == 48
    expected = average_landmarks([(s["landmarks"], s["num_images"]) for s in sites.values()])
    assert recorded["standard_landmarks"] == pytest.approx(expected)

    sessions = _sessions(result)
    for name in sessions:
        state = json.loads((result.run_dir.site_dir(name) / "normalization.json").read_text())
        assert state["standard_landmarks"] == pytest.approx(expected)  # kept with the site's state
        assert state["stats"]["method"] == "nyul"
    raw = {name: _foreground_quantiles(session, raw=True) for name, session in sessions.items()}
    mapped = {name: _foreground_quantiles(session, raw=False) for name, session in sessions.items()}
    assert np.abs(raw["site-a"] - raw["site-b"]).max() > 20  # the scanners disagree by tens of units
    assert np.abs(mapped["site-a"] - mapped["site-b"]).max() < 0.05  # on the common scale they agree


def test_site_zscore_is_fitted_at_each_site_from_its_training_images(tiny_config) -> None:
    config = tiny_config(
        task={"intensity": "site_zscore"},
        synth={"sites": DRIFTED},
        train={"rounds": 1},
        evaluation={"cross_site": False},
    )
    result = simulate(config)
    for name, session in _sessions(result).items():
        state = json.loads((result.run_dir.site_dir(name) / "normalization.json").read_text())
        train = session.raw_data.train
        foreground = torch.cat([s["image"][foreground_mask(s["image"], rule="mean")] for s in train]).double()
        assert state["stats"]["values"]["mean"] == pytest.approx(float(foreground.mean()), rel=1e-4)
        normalized = torch.cat(
            [s["image"][foreground_mask(r["image"], rule="mean")] for s, r in zip(session.data.train, train)]
        ).double()
        assert float(normalized.mean()) == pytest.approx(0.0, abs=1e-3)
        assert float(normalized.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)
        # Validation images use the training statistics, not their own.
        values = state["stats"]["values"]
        for normalized, raw in zip(session.data.val, session.raw_data.val, strict=True):
            assert torch.allclose(normalized["image"], (raw["image"] - values["mean"]) / values["std"], atol=1e-5)


def test_cross_site_matrix_with_personalized_models_and_baselines(tiny_config) -> None:
    config = tiny_config(
        strategy={"fedbn": True},
        task={"intensity": "site_zscore"},
        evaluation={"cross_site_every": 1, "finetune_epochs": 1},
        baselines={"local_only": True, "pooled": True},
    )
    result = simulate(config)
    sites = ["site-a", "site-b", "site-c"]
    recorded = result.run_dir.read_json("cross_site.json")
    assert recorded["metric"] == "dice" and recorded["higher_is_better"] is True
    assert [(entry["round"], entry["final"]) for entry in recorded["evaluations"]] == [(1, False), (2, True)]
    final = recorded["evaluations"][-1]
    personalized = [f"personalized:{site}" for site in sites]
    local = [f"local-only:{site}" for site in sites]
    assert final["models"] == ["global", *personalized, *local, "pooled"]
    for model in final["models"]:
        assert set(final["metrics"][model]) == set(sites), model
        assert all(0.0 <= cell["dice"] <= 1.0 for cell in final["metrics"][model].values())
    # The matrix's diagonal and its global row are the summary's personalized and federated columns.
    summary = result.summary
    for site in sites:
        assert summary["sites"][site]["personalized"]["dice"] == final["metrics"][f"personalized:{site}"][site]["dice"]
        assert summary["sites"][site]["federated"]["dice"] == pytest.approx(final["metrics"]["global"][site]["dice"])
        assert summary["sites"][site]["local_only"]["dice"] == final["metrics"][f"local-only:{site}"][site]["dice"]
        assert (result.run_dir.site_dir(site) / "personalized_model.pt").exists()
    # A personal model is its fine-tune's best epoch on the site's tuning split; epoch 0 is the global model itself
    # (with the site's own FedBN layers).
    for site in sites:
        home = final["metrics"][f"personalized:{site}"][site]
        if home["finetune_best_epoch"] == 0:
            assert home["dice"] == pytest.approx(final["metrics"]["global"][site]["dice"])
        chosen = "personalized" if home["delivered_personalized"] else "global"
        assert summary["sites"][site]["delivered_model"] == chosen
        assert summary["sites"][site]["delivered"] == summary["sites"][site][chosen.replace("global", "federated")]
    # Intermediate evaluations personalize with the local layers only (no fine-tune): still a full matrix.
    first = recorded["evaluations"][0]
    assert set(first["models"]) == {"global", *personalized}
    assert summary["personalized"]["worst_site"] == min(summary["sites"][s]["personalized"]["dice"] for s in sites)


def test_without_fedbn_or_a_fine_tune_the_matrix_has_the_global_model_only(tiny_config) -> None:
    result = simulate(tiny_config(evaluation={"finetune_epochs": 0}))
    final = result.run_dir.read_json("cross_site.json")["evaluations"][-1]
    assert final["models"] == ["global"]
    assert set(final["metrics"]["global"]) == {"site-a", "site-b", "site-c"}
    assert "personalized" not in result.summary


def test_fine_tuning_is_refused_under_dp_sgd(tiny_config) -> None:
    with pytest.raises(ConfigError, match="finetune_epochs must be 0 with dp_sgd"):
        tiny_config(dp_sgd={"enabled": True}, evaluation={"finetune_epochs": 1})


def test_a_site_with_unusable_normalization_state_is_refused_with_the_file_named(tiny_config, tmp_path) -> None:
    config = tiny_config(task={"intensity": "nyul"}, synth={"sites": DRIFTED})
    site = materialize_sites(config).sites[0]
    session = SiteSession(SiteSpec(name=site.name, data_path=site.path, state_dir=tmp_path / "state"), config)
    session.describe_intensities()
    with pytest.raises(NormalizationStateError, match="no federation landmarks"):
        _ = session.data  # the coordinator never sent the federation's scale
    session.use_standard_landmarks([0.0, 0.5, 1.0])  # from a run config with other landmarks
    with pytest.raises(NormalizationStateError, match=r"normalization\.landmarks has 11.*normalization\.json"):
        _ = session.data

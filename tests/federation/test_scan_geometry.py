"""Whole federations in scan geometry: two-modality volumes at native spacing, patches, sliding windows."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from scan_sites import SITES, write_scan_site

from fedmed.config import run_config_from_dict
from fedmed.workflows.simulate import simulate


@pytest.fixture(scope="module")
def scan_sites(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    root = tmp_path_factory.mktemp("scan-sites")
    return [{"name": name, "path": str(write_scan_site(root, name, cases=6, seed=i))} for i, name in enumerate(SITES)]


def _config(tmp_path: Path, sites: list[dict[str, str]], **sections: dict) -> object:
    raw = {
        "name": "scan",
        "output_dir": str(tmp_path / "runs"),
        "task": {"kind": "segmentation", "spatial_dims": 3, "num_classes": 3, "spacing": [1.2, 1.2, 1.2]},
        "model": {"channels": [8, 16, 32]},
        "train": {"rounds": 2, "local_epochs": 2, "batch_size": 2, "learning_rate": 0.01, "patch_size": [16, 16, 16]},
        "sites": sites,
        "evaluation": {"cross_site": False},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return run_config_from_dict(raw, base=tmp_path)


@pytest.mark.slow
def test_two_modality_federation_reports_classes_and_regions_in_millimetres(
    scan_sites: list[dict[str, str]], tmp_path: Path
) -> None:
    config = _config(
        tmp_path,
        scan_sites,
        task={"regions": {"whole_lesion": [1, 2], "core": [2]}},
        baselines={"local_only": True},
    )
    result = simulate(config)
    # in_channels and the class names came from the data.
    assert result.config.task.in_channels == 2
    assert result.config.task.class_names == ["oedema", "core"]
    for site in SITES:
        metrics = result.summary["sites"][site]["federated"]
        for key in (
            "dice",
            "dice_oedema",
            "dice_core",
            "dice_whole_lesion",
            "hd95",
            "msd",
            "hd95_core",
            "msd_whole_lesion",
        ):
            assert key in metrics, f"{site}: {key} missing from {sorted(metrics)}"
        assert 0.0 <= metrics["dice"] <= 1.0
        assert math.isfinite(metrics["hd95"]) or math.isnan(metrics["hd95"])
        rows = list(csv.DictReader((result.run_dir.site_dir(site) / "evaluation" / "global-cases.csv").open()))
        assert len(rows) == 2, "one row per validation case"
        assert len({row["case"] for row in rows}) == 2 and all(row["images"] for row in rows), rows
        mean = float(np.nanmean([float(row["dice"]) for row in rows]))
        assert mean == pytest.approx(metrics["dice"], abs=1e-6)
    assert set(result.summary["sites"]) == set(SITES)
    assert "local_only" in result.summary["sites"]["site-a"]


@pytest.mark.slow
def test_dp_sgd_trains_one_patch_per_case_and_charges_the_ledger(
    scan_sites: list[dict[str, str]], tmp_path: Path
) -> None:
    # RDP: PRV's calibration takes a minute for sites this small (a sampling rate of 1/2). σ 2: few steps, so
    # that 4 cases per site stay below the mostly-noise line (the default σ 4 would plan the step cap).
    dp_sgd = {"enabled": True, "accountant": "rdp", "noise_multiplier": 2.0}
    config = _config(tmp_path, scan_sites, train={"rounds": 1, "local_epochs": 1}, dp_sgd=dp_sgd)
    result = simulate(config)
    for site in SITES:
        spent = result.summary["privacy"][site]["epsilon"]
        assert 0 < spent <= 8.0


def test_dp_sgd_refuses_several_patches_per_case(scan_sites: list[dict[str, str]], tmp_path: Path) -> None:
    from fedmed.core.errors import ConfigError

    with pytest.raises(ConfigError, match="samples_per_volume = 1"):
        _config(tmp_path, scan_sites, train={"samples_per_volume": 2}, dp_sgd={"enabled": True})


@pytest.mark.slow
def test_denoising_is_scored_on_the_whole_volume_in_original_space(
    scan_sites: list[dict[str, str]], tmp_path: Path
) -> None:
    config = _config(
        tmp_path,
        scan_sites,
        task={"kind": "enhancement", "num_classes": 2, "intensity": "percentile", "noise_std": 0.1},
        train={"rounds": 1, "local_epochs": 1},
    )
    result = simulate(config)
    for site in SITES:
        metrics = result.summary["sites"][site]["federated"]
        # The untrained residual network starts as the identity; one round must not make it worse than its input.
        assert metrics["psnr"] > metrics["psnr_input"] - 1.0
        assert 0 < metrics["ssim"] <= 1


@pytest.mark.slow
@pytest.mark.parametrize(("cross_validate_below", "held_out"), [(0, 1), (5, 4)])
def test_fine_tuning_in_scan_geometry_holds_out_whole_volumes_and_chooses_on_them(
    scan_sites: list[dict[str, str]], tmp_path: Path, cross_validate_below: int, held_out: int
) -> None:
    """A tuning split of 1 training volume of 4, or leave-one-out over all 4 (the default for a site this small)."""
    config = _config(
        tmp_path,
        scan_sites,
        train={"rounds": 1, "local_epochs": 1},
        evaluation={
            "cross_site": True,
            "finetune_epochs": 2,
            "tuning_fraction": 0.25,
            "cross_validate_below": cross_validate_below,
        },
    )
    result = simulate(config)
    final = result.run_dir.read_json("cross_site.json")["evaluations"][-1]
    for site in SITES:
        home = final["metrics"][f"personalized:{site}"][site]
        assert home["tuning_cases"] == held_out  # training volumes scored whole by sliding window
        assert home.get("choice_folds") == (4 if cross_validate_below else None)
        assert 0.0 <= home["tuning_dice_global"] <= 1.0 and 0.0 <= home["tuning_dice_personalized"] <= 1.0
        assert result.summary["sites"][site]["delivered_model"] in ("global", "personalized")

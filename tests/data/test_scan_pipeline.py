"""Scan geometry on real NIfTI files: native size, anisotropic spacing, LPS storage, patches, inversion."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from data_helpers import save_nifti

from fedmed.config import run_config_from_dict
from fedmed.data.scan_site import open_scan_site
from fedmed.tasks.volumes import predict_labelmap, sliding_window_inferer, to_original_grid

SHAPE = (40, 36, 12)
# Stored LPS (first two axes flipped) at 0.8 x 0.8 x 3 mm with an offset: nothing about it matches RAS 1 mm.
AFFINE = np.array([[-0.8, 0, 0, 30.0], [0, -0.8, 0, 20.0], [0, 0, 3.0, -15.0], [0, 0, 0, 1]])


def _case(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[8:24, 10:26, 3:9] = 1
    label[12:18, 14:20, 4:7] = 2  # nested inside class 1
    flair = (100 + 80 * (label > 0) + rng.normal(0, 5, SHAPE)).astype(np.float32)
    t1 = (300 - 100 * (label == 2) + rng.normal(0, 5, SHAPE)).astype(np.float32)
    return flair, t1, label


@pytest.fixture
def scan_site(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    entries = []
    for number in range(4):
        flair, t1, label = _case(number)
        paths = [
            save_nifti(site / "imagesTr" / f"case{number}_{name}.nii.gz", array, AFFINE)
            for name, array in (("flair", flair), ("t1", t1))
        ]
        label_path = save_nifti(site / "labelsTr" / f"case{number}.nii.gz", label, AFFINE)
        entries.append(
            {"image": [f"./{p.relative_to(site)}" for p in paths], "label": f"./{label_path.relative_to(site)}"}
        )
    manifest = {
        "name": "site",
        "modality": {"0": "FLAIR", "1": "T1"},
        "labels": {"0": "background", "1": "oedema", "2": "core"},
        "training": entries[1:],
        "validation": entries[:1],
    }
    (site / "dataset.json").write_text(json.dumps(manifest))
    return site


def _config(tmp_path: Path, **overrides: dict) -> object:
    raw = {
        "task": {
            "kind": "segmentation",
            "spatial_dims": 3,
            "num_classes": 3,
            "in_channels": 2,
            "spacing": [1.5, 1.5, 1.5],
            "regions": {"lesion": [1, 2]},
        },
        "train": {"patch_size": [16, 16, 16], "batch_size": 2},
        "model": {"channels": [4, 8, 16]},
    }
    for section, values in overrides.items():
        raw[section] = {**raw.get(section, {}), **values}
    return run_config_from_dict(raw, base=tmp_path)


def test_patches_have_the_patch_size_and_both_modalities(scan_site: Path, tmp_path: Path) -> None:
    site = open_scan_site(scan_site, config=_config(tmp_path), cache_dir=None)
    assert (site.num_train, site.num_val, site.channels) == (3, 1, 2)
    sample = site.train[0]
    assert sample["image"].shape == (2, 16, 16, 16)
    assert sample["label"].shape == (1, 16, 16, 16) and sample["label"].dtype == torch.int64
    # Per-channel z-score: each modality normalized on its own scale.
    volume = site.val[0]["image"]
    assert torch.allclose(volume.reshape(2, -1).mean(dim=1), torch.zeros(2), atol=1e-3)


def test_validation_volume_is_resampled_and_inverts_to_the_source_grid(scan_site: Path, tmp_path: Path) -> None:
    site = open_scan_site(scan_site, config=_config(tmp_path), cache_dir=None)
    volume = site.val[0]["image"]
    # 40 x 0.8 mm = 32 mm -> about 21 voxels at 1.5 mm; 12 x 3 mm -> 24 voxels.
    assert tuple(volume.shape[1:]) == pytest.approx((21, 19, 24), abs=1)
    back = to_original_grid(volume.as_tensor(), image=volume, preprocessing=site.val.preprocessing)
    assert tuple(back.shape[1:]) == SHAPE
    np.testing.assert_allclose(back.affine.numpy(), AFFINE, atol=1e-5)
    source = nib.load(str(site.val.records[0]["image"][0])).get_fdata()
    # The round trip through 1.5 mm blurs but keeps the anatomy where it was (orientation undone).
    assert np.corrcoef(back.numpy()[0].ravel(), source.ravel())[0, 1] > 0.8


def test_predicted_labelmap_lands_on_the_source_grid(scan_site: Path, tmp_path: Path) -> None:
    from fedmed.models import build_model

    config = _config(tmp_path)
    site = open_scan_site(scan_site, config=config, cache_dir=None)
    inferer = sliding_window_inferer(roi_size=config.roi_size, inference=config.inference, device=torch.device("cpu"))
    labelmap = predict_labelmap(
        build_model(config.task, config.model), site.val, 0, inferer=inferer, device=torch.device("cpu")
    )
    assert tuple(labelmap.shape) == (1, *SHAPE)
    np.testing.assert_allclose(labelmap.affine.numpy(), AFFINE, atol=1e-5)


def test_perfect_prediction_scores_one_everywhere_in_millimetres(tmp_path: Path) -> None:
    from fedmed.tasks.volumes import segmentation_case_metrics

    config = _config(tmp_path)
    _, _, label = _case(0)
    truth = torch.from_numpy(label.astype(np.int64))[None]
    row = segmentation_case_metrics(truth, truth, task=config.task, spacing=[0.8, 0.8, 3.0])
    assert row["dice"] == pytest.approx(1.0)
    assert row["dice_class1"] == pytest.approx(1.0) and row["dice_lesion"] == pytest.approx(1.0)
    assert row["hd95"] == pytest.approx(0.0) and row["msd"] == pytest.approx(0.0)
    shifted = torch.roll(truth, shifts=1, dims=3)  # one slice along the 3 mm axis
    moved = segmentation_case_metrics(shifted, truth, task=config.task, spacing=[0.8, 0.8, 3.0])
    assert moved["hd95"] == pytest.approx(3.0)  # millimetres, not voxels


def test_memory_cache_holds_at_most_max_cached_cases(scan_site: Path, tmp_path: Path) -> None:
    site = open_scan_site(
        scan_site, config=_config(tmp_path, data={"cache": "memory", "max_cached_cases": 2}), cache_dir=None
    )
    for index in range(len(site.train)):
        site.train[index]
    cached = [item for item in site.train.source._cache if item is not None]
    assert len(cached) == 2
    # The validation case gets no room once training took the whole budget.
    assert not hasattr(site.val.dataset, "_cache") or not any(site.val.dataset._cache)


def test_disk_cache_lives_in_the_site_folder_given(scan_site: Path, tmp_path: Path) -> None:
    cache = tmp_path / "state" / "preprocessed"
    site = open_scan_site(scan_site, config=_config(tmp_path, data={"cache": "disk"}), cache_dir=cache)
    site.train[0]
    written = list(cache.rglob("*.pt"))
    assert written, "the preprocessed case was not written to the site's cache folder"
    # Another account on the site's machine must not read the preprocessed patient images.
    for folder in (cache, *[path for path in cache.rglob("*") if path.is_dir()]):
        assert folder.stat().st_mode & 0o077 == 0, f"{folder} is open to other accounts"
    for _ in range(2):  # preprocessed and cached, then read back from the cache
        volume = site.val[0]["image"]
        back = to_original_grid(volume.as_tensor(), image=volume, preprocessing=site.val.preprocessing)
        assert tuple(back.shape[1:]) == SHAPE, "a cached validation volume must still invert"


def test_augmented_patches_differ_between_seeds_and_repeat_with_the_same_seed(scan_site: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, train={"augmentation": {"rotate_degrees": 15, "scale": 0.1, "gamma": 0.2}})
    site = open_scan_site(scan_site, config=config, cache_dir=None)
    draws = []
    for seed in (1, 1, 2):
        site.train.set_random_state(seed)
        draws.append(site.train[0]["image"])
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])


def test_the_log_names_the_cache_in_use_and_how_full_it_is(scan_site: Path, tmp_path: Path) -> None:
    import logging

    from fedmed.core.log import logger

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(f"{record.levelname} {record.getMessage()}")  # type: ignore[method-assign]
    saved = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        config = _config(tmp_path, data={"cache": "disk"})
        cache = tmp_path / "state" / "preprocessed"
        open_scan_site(scan_site, config=config, cache_dir=None, check_only=True)
        site = open_scan_site(scan_site, config=config, cache_dir=cache)
        for index in range(len(site.train)):
            site.train[index]
        site.val[0]
        open_scan_site(scan_site, config=config, cache_dir=cache)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)
    checked, first, again = [line for line in lines if " site 'site'" in line]
    # simulate's look at the data, which logs the counts itself: no cache named, only at debug level
    assert checked.startswith("DEBUG") and checked.endswith("(2 channels), checked") and "cache" not in checked
    assert first.startswith("INFO") and again.startswith("INFO")
    assert first.endswith(
        f"cache disk in {cache} (0 of 4 cases preprocessed already; the first round preprocesses the rest)"
    )
    assert again.endswith(f"cache disk in {cache} (4 of 4 cases preprocessed already)")

"""A site's per-case metrics files (global-cases.csv, personalized-cases.csv) name every case by a stable id,
even where every subject's files are named alike (BraTS: `<subject>/Flair.nii.gz`), with its files beside it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fedmed.config import run_config_from_dict
from fedmed.data.scan_site import open_scan_site
from fedmed.models import build_model
from fedmed.site.trainer import named_by_case_id, write_case_metrics
from fedmed.tasks.volumes import evaluate_segmentation_volumes

SHAPE = (24, 20, 10)
AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, AFFINE), str(path))
    return path


@pytest.fixture
def brats_style_site(tmp_path: Path) -> Path:
    """Three subjects, each a folder holding Flair.nii.gz, T1c.nii.gz and seg.nii.gz."""
    site = tmp_path / "site"
    entries = []
    for number in range(3):
        rng = np.random.default_rng(number)
        label = np.zeros(SHAPE, dtype=np.uint8)
        label[6:16, 5:15, 2:8] = 1
        label[9:13, 8:12, 3:6] = 2
        subject = site / f"BraTS-{number:03d}"
        for name, scale in (("Flair", 80.0), ("T1c", -60.0)):
            _save(subject / f"{name}.nii.gz", (200 + scale * (label > 0) + rng.normal(0, 5, SHAPE)).astype(np.float32))
        _save(subject / "seg.nii.gz", label)
        folder = f"./{subject.name}"
        entries.append({"image": [f"{folder}/Flair.nii.gz", f"{folder}/T1c.nii.gz"], "label": f"{folder}/seg.nii.gz"})
    manifest = {
        "name": "site",
        "modality": {"0": "FLAIR", "1": "T1c"},
        "labels": {"0": "background", "1": "oedema", "2": "core"},
        "training": entries[:1],
        "validation": entries[1:],
    }
    (site / "dataset.json").write_text(json.dumps(manifest))
    return site


def test_brats_style_cases_are_named_by_their_subject_folder(brats_style_site: Path, tmp_path: Path) -> None:
    config = run_config_from_dict(
        {
            "task": {
                "kind": "segmentation",
                "spatial_dims": 3,
                "num_classes": 3,
                "in_channels": 2,
                "class_names": ["oedema", "core"],
                "spacing": [2.0, 2.0, 2.0],
                "regions": {"lesion": [1, 2]},
            },
            "train": {"patch_size": [16, 16, 16], "batch_size": 2},
            "model": {"channels": [4, 8, 16]},
        },
        base=tmp_path,
    )
    site = open_scan_site(brats_style_site, config=config, cache_dir=None)
    torch.manual_seed(0)
    model = build_model(config.task, config.model)
    _, rows = evaluate_segmentation_volumes(model, site.val, task=config.task, device=torch.device("cpu"))
    assert [row["case"] for row in rows] == ["Flair.nii.gz", "Flair.nii.gz"]  # what the records call them

    path = tmp_path / "evaluation" / "global-cases.csv"
    write_case_metrics(path, named_by_case_id(rows, site.val.records))
    written = list(csv.DictReader(path.open()))
    assert [row["case"] for row in written] == ["BraTS-001", "BraTS-002"]
    for number, row in zip((1, 2), written, strict=True):
        subject = brats_style_site / f"BraTS-{number:03d}"
        assert row["images"] == f"{subject / 'Flair.nii.gz'};{subject / 'T1c.nii.gz'}"
    # The per-class and per-region surface distances are columns too, beside Dice's.
    for key in ("dice_core", "hd95_oedema", "hd95_core", "hd95_lesion", "msd_oedema", "msd_lesion"):
        assert key in written[0], sorted(written[0])
    assert float(written[0]["dice"]) == pytest.approx(rows[0]["dice"])


def test_unique_file_stems_name_the_cases() -> None:
    records = [{"image": "/data/imagesTr/hippocampus_001.nii.gz"}, {"image": "/data/imagesTr/hippocampus_017.nii.gz"}]
    rows = [{"case": "hippocampus_001.nii.gz", "dice": 0.8}, {"case": "hippocampus_017.nii.gz", "dice": 0.7}]
    named = named_by_case_id(rows, records)
    assert named == [
        {"case": "hippocampus_001", "images": "/data/imagesTr/hippocampus_001.nii.gz", "dice": 0.8},
        {"case": "hippocampus_017", "images": "/data/imagesTr/hippocampus_017.nii.gz", "dice": 0.7},
    ]

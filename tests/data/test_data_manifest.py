"""dataset.json reading and writing, and MedMNIST-style .npz sites."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import fedmed_warnings

from fedmed.config import TaskConfig
from fedmed.data import Case, DataValidationError, load_site, read_manifest, read_npz_site, write_manifest


def test_write_then_read_round_trip_keeps_cases_and_writes_relative_paths(tmp_path: Path) -> None:
    site = tmp_path / "site"
    training = [
        Case(image=site / "imagesTr" / f"c{i}.nii.gz", label=site / "labelsTr" / f"c{i}.nii.gz") for i in range(3)
    ]
    validation = [Case(image=site / "imagesTr" / "v0.nii.gz", label=site / "labelsTr" / "v0.nii.gz")]
    site.mkdir()
    write_manifest(
        site,
        name="hospital-a",
        labels={0: "background", 1: "tumour"},
        modality={0: "T1"},
        training=training,
        validation=validation,
        tensor_image_size="3D",
    )
    raw = json.loads((site / "dataset.json").read_text())
    assert raw["training"][0] == {"image": "./imagesTr/c0.nii.gz", "label": "./labelsTr/c0.nii.gz"}
    assert raw["labels"] == {"0": "background", "1": "tumour"}
    assert raw["numTraining"] == 3

    manifest = read_manifest(site)
    assert manifest.name == "hospital-a"
    assert manifest.labels == {0: "background", 1: "tumour"}
    assert manifest.modality == {0: "T1"}
    resolved = [Case(image=c.image.resolve(), label=c.label.resolve()) for c in training]  # type: ignore[union-attr]
    assert manifest.training == resolved
    assert manifest.validation[0].image.is_absolute()
    assert manifest.kind == "segmentation"
    assert manifest.source == (site / "dataset.json").resolve()


def test_moved_site_folder_still_resolves_its_files(tmp_path: Path) -> None:
    site = tmp_path / "before"
    site.mkdir()
    write_manifest(
        site,
        name="s",
        labels={0: "normal", 1: "lesion"},
        modality="CT",
        training=[Case(image=site / "a.nii.gz", label=1)],
        validation=[Case(image=site / "b.nii.gz", label=0)],
        tensor_image_size="2D",
    )
    moved = site.rename(tmp_path / "after")
    manifest = read_manifest(moved)
    assert manifest.training[0].image == (moved / "a.nii.gz").resolve()
    assert manifest.training[0].label == 1
    assert manifest.kind == "classification"


def test_msd_style_file_is_accepted_and_unknown_keys_only_warn(tmp_path: Path) -> None:
    site = tmp_path / "Task04_Hippocampus"
    site.mkdir()
    content = {
        "name": "Hippocampus",
        "description": "Left and right hippocampus segmentation",
        "reference": " Vanderbilt University Medical Center",
        "licence": "CC-BY-SA 4.0",
        "release": "1.0 04/05/2018",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
        "numTraining": 1,
        "numTest": 1,
        "training": [{"image": "./imagesTr/hippocampus_367.nii.gz", "label": "./labelsTr/hippocampus_367.nii.gz"}],
        "test": ["./imagesTs/hippocampus_267.nii.gz"],
        "validation": [{"image": "./imagesTr/hippocampus_368.nii.gz", "label": "./labelsTr/hippocampus_368.nii.gz"}],
        "scanner_notes": "not an MSD key",
    }
    (site / "dataset.json").write_text(json.dumps(content))
    with fedmed_warnings() as warned:
        manifest = read_manifest(site)
    assert manifest.labels == {0: "background", 1: "Anterior", 2: "Posterior"}
    assert manifest.training[0].label == (site / "labelsTr" / "hippocampus_367.nii.gz").resolve()
    assert len(warned) == 1 and "scanner_notes" in warned[0]


def test_enhancement_manifest_needs_no_labels(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "dataset.json").write_text(
        json.dumps({"name": "x", "training": ["./a.nii.gz", {"image": "./b.nii.gz"}], "validation": ["./c.nii.gz"]})
    )
    manifest = read_manifest(site)
    assert manifest.kind == "enhancement"
    assert [case.label for case in manifest.training] == [None, None]


def test_read_manifest_raises_with_every_structural_problem(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "dataset.json").write_text(json.dumps({"labels": {"zero": "bg"}, "training": [{"label": 1}]}))
    with pytest.raises(DataValidationError) as caught:
        read_manifest(site)
    text = str(caught.value)
    assert "'validation'" in text and "'zero'" in text and "training[0]" in text
    assert len(caught.value.problems) == 3


def _tiny_npz(path: Path, *, label_shape: str = "flat") -> Path:
    rng = np.random.default_rng(0)
    train_labels = np.array([0, 1, 1, 0, 1], dtype=np.uint8)
    val_labels = np.array([1, 0], dtype=np.uint8)
    if label_shape == "column":
        train_labels, val_labels = train_labels[:, None], val_labels[:, None]
    np.savez_compressed(
        path,
        train_images=rng.integers(0, 256, size=(5, 20, 20), dtype=np.uint8),
        train_labels=train_labels,
        val_images=rng.integers(0, 256, size=(2, 20, 20), dtype=np.uint8),
        val_labels=val_labels,
        test_images=np.zeros((1, 20, 20), dtype=np.uint8),
        test_labels=np.zeros((1,), dtype=np.uint8),
    )
    return path


@pytest.mark.parametrize("label_shape", ["flat", "column"])
def test_tiny_npz_site_reads_and_loads(tmp_path: Path, label_shape: str) -> None:
    path = _tiny_npz(tmp_path / "mini.npz", label_shape=label_shape)
    site = read_npz_site(path)
    assert site.name == "mini"
    assert site.train_labels.tolist() == [0, 1, 1, 0, 1]
    task = TaskConfig(kind="classification", spatial_dims=2, image_size=[32, 32], intensity="minmax")
    data = load_site(path, task=task)
    assert (data.num_train, data.num_val) == (5, 2)
    sample = data.train[1]
    assert sample["image"].shape == (1, 32, 32) and sample["image"].dtype == torch.float32
    assert float(sample["image"].min()) == 0.0 and float(sample["image"].max()) == pytest.approx(1.0)
    assert sample["label"].dtype == torch.int64 and sample["label"].ndim == 0 and int(sample["label"]) == 1
    assert [int(s["label"]) for s in data.val] == [1, 0]


@pytest.mark.parametrize(
    ("file_name", "n_train", "n_val"), [("pneumoniamnist.npz", 2428, 270), ("breastmnist.npz", 546, 78)]
)
def test_real_medmnist_files_load(
    shared_dataset: Callable[[str], Path], file_name: str, n_train: int, n_val: int
) -> None:
    path = shared_dataset(f"medmnist/{file_name}")
    site = read_npz_site(path)
    assert site.train_labels.shape == (n_train,)  # (N, 1) in pneumoniamnist is flattened
    assert set(np.unique(site.train_labels)) == {0, 1}
    task = TaskConfig(kind="classification", spatial_dims=2, image_size=[28, 28])
    data = load_site(path, task=task)
    assert (data.num_train, data.num_val) == (n_train, n_val)
    image = data.train[0]["image"]
    assert image.shape == (1, 28, 28)
    assert float(image.mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(image.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)
    positives = sum(int(sample["label"]) for sample in data.train)
    assert 0 < positives < n_train

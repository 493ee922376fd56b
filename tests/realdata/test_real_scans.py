"""Scan geometry on real scans from ../shared/data (skipped when absent): native voxel sizes, several
modalities, patch training, sliding-window validation, predictions back on the source file's grid.

Each test runs the shortest training that still goes through the whole path; accuracy is the
benchmark's business (experiments/bench_real_scans.py), not these tests'.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import nibabel
import numpy as np
import pytest
import torch

from fedmed.config import RunConfig, SiteDrift, run_config_from_dict
from fedmed.data import Case, cases_from_folder_pairs, cases_from_subfolders, split_into_sites, write_manifest
from fedmed.data.scan_site import ScanSite, open_scan_site
from fedmed.models import build_model
from fedmed.tasks import get_task, train_local
from fedmed.tasks.volumes import evaluate_segmentation_volumes, predict_labelmap, sliding_window_inferer
from fedmed.workflows.predict import input_cases, predict_cases
from fedmed.workflows.simulate import simulate
from fedmed.workflows.trained_model import load_trained_model

CPU = torch.device("cpu")
# Simulated scanners: the MSD hippocampus crops all come from one centre.
HIPPOCAMPUS_SCANNERS = [
    SiteDrift(name="hippo-a"),
    SiteDrift(name="hippo-b", intensity_scale=1.8, intensity_offset=100.0, gamma=0.8, noise_std=0.02),
    SiteDrift(name="hippo-c", bias_field=0.25, blur_sigma=0.8),
]
HIPPOCAMPUS_LABELS = {0: "background", 1: "anterior", 2: "posterior"}
# Every hippocampus crop (at most 43 x 59 x 47 voxels) fits one window: validation is one forward pass per case.
# Quick, and enough for the path; for accuracy a window of the patch's size is better (see bench_real_scans.py).
HIPPOCAMPUS_WINDOW = [48, 64, 48]


def _config(tmp_path: Path, raw: dict[str, Any]) -> RunConfig:
    return run_config_from_dict({"output_dir": str(tmp_path / "runs"), "seed": 0, **raw}, base=tmp_path)


def _header(path: str | Path) -> tuple[tuple[int, ...], np.ndarray]:
    image = nibabel.load(str(path))
    return tuple(int(size) for size in image.shape[:3]), np.asarray(image.affine, dtype=np.float64)


def _assert_on_source_grid(labelmap: Any, source: str | Path) -> None:
    """The prediction has the source file's shape (one channel) and, to float32 precision, its affine."""
    shape, affine = _header(source)
    assert tuple(labelmap.shape) == (1, *shape), f"prediction {tuple(labelmap.shape)} vs {source}: {shape}"
    np.testing.assert_allclose(np.asarray(labelmap.affine, dtype=np.float64), affine, atol=1e-4)


def _first_image(record: dict[str, Any]) -> str:
    image = record["image"]
    return image[0] if isinstance(image, list) else image


def _site_folder(folder: Path, *, name: str, cases: list[Case], n_val: int, modality: dict[int, str]) -> Path:
    """An MSD site folder whose dataset.json points at the shared files where they are (absolute paths)."""
    folder.mkdir(parents=True)
    write_manifest(
        folder,
        name=name,
        labels={0: "background", 1: "lesion"},
        modality=modality,
        training=cases[n_val:],
        validation=cases[:n_val],
        tensor_image_size="3D",
    )
    return folder


def _dice(labelmap: torch.Tensor, label_path: str, *, num_classes: int) -> float:
    """MONAI's DiceMetric on the prediction and the label file as stored, mean over foreground classes."""
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot
    from monai.transforms import LoadImage

    truth = LoadImage(image_only=True, ensure_channel_first=True, reader="NibabelReader")(label_path)
    truth = torch.round(truth.as_tensor()).to(torch.int64)
    predicted = one_hot(labelmap.to(torch.int64)[None], num_classes=num_classes)
    scores = DiceMetric(include_background=False, reduction="none")(predicted, one_hot(truth[None], num_classes))
    return float(scores.mean())


@pytest.mark.slow
def test_hippocampus_federation_scores_per_class_in_original_space(shared_data: Path, tmp_path: Path) -> None:
    root = shared_data / "msd-hippocampus"
    cases = cases_from_folder_pairs(root / "imagesTr", root / "labelsTr")[:12]
    sites = split_into_sites(
        cases,
        drifts=HIPPOCAMPUS_SCANNERS,
        out_dir=tmp_path / "sites",
        image_size=None,  # native 1 mm crops, each its own size
        binarize_labels=False,
        val_fraction=0.25,
        seed=0,
        label_names=HIPPOCAMPUS_LABELS,
    )
    config = _config(
        tmp_path,
        {
            "name": "hippocampus",
            "task": {
                "kind": "segmentation",
                "spatial_dims": 3,
                "num_classes": 3,
                "spacing": [1, 1, 1],
                "regions": {"hippocampus": [1, 2]},
            },
            "model": {"channels": [8, 16, 32]},
            "train": {"rounds": 2, "local_epochs": 1, "batch_size": 2, "patch_size": [32, 32, 32]},
            "inference": {"roi_size": HIPPOCAMPUS_WINDOW},
            "evaluation": {"cross_site": False},
            "sites": [{"name": site.name, "path": str(site.path)} for site in sites],
        },
    )
    result = simulate(config)

    assert result.config.task.class_names == ["anterior", "posterior"]  # from the sites' dataset.json
    for site, row in result.summary["sites"].items():
        metrics = row["federated"]
        for key in ("dice", "dice_anterior", "dice_posterior", "dice_hippocampus"):
            assert math.isfinite(metrics[key]) and 0.0 <= metrics[key] <= 1.0, f"{site}: {key} = {metrics.get(key)}"

    # Done when: `fedmed predict` with the run's final global model gives, for a validation case, a label map
    # on the source's grid whose Dice is the value the site reported for that case.
    site = sites[0]
    rows = list(csv.DictReader((result.run_dir.path / "sites" / site.name / "evaluation" / "global-cases.csv").open()))
    record = open_scan_site(site.path, config=result.config, cache_dir=None).val.records[0]
    written = _predict_with_cli_path(result.run_dir.path, record, out_dir=tmp_path / "predicted")
    _assert_written_on_source_grid(written, _first_image(record))
    (row,) = [row for row in rows if row["images"].split(";")[0] == str(_first_image(record))]
    dice = _dice(torch.from_numpy(np.asarray(nibabel.load(str(written)).dataobj))[None], record["label"], num_classes=3)
    assert dice == pytest.approx(float(row["dice"]), abs=1e-5)

    # The out-of-distribution score, from the sites' model card, puts a CT far from MRI the federation never saw.
    held_back = [case.image for case in cases_from_folder_pairs(root / "imagesTr", root / "labelsTr")[12:15]]
    ct = _crop(shared_data / "msd-spleen-ct-1" / "imagesTr" / "spleen_8.nii.gz", tmp_path / "ct.nii.gz")
    trained = load_trained_model(result.run_dir.path)
    inputs = input_cases([*held_back, ct], task=trained.config.task)
    outcomes = list(predict_cases(trained, inputs, out_dir=tmp_path / "ood", device=CPU))
    *mri, ct_outcome = [outcome.ood_score for outcome in outcomes]
    assert None not in mri and ct_outcome is not None and ct_outcome > 2 * max(mri), (mri, ct_outcome)
    assert outcomes[-1].ood_flagged


def _crop(source: Path, target: Path) -> Path:
    """A hippocampus-sized block (about 40 x 56 x 40 mm) from the middle of a volume, with its affine."""
    image = nibabel.load(str(source))
    spacing = np.abs(np.diag(image.affine)[:3])
    size = [min(max(8, round(float(mm / s))), n) for mm, s, n in zip((40, 56, 40), spacing, image.shape, strict=True)]
    start = [(n - s) // 2 for n, s in zip(image.shape, size, strict=True)]
    block = np.asarray(image.dataobj)[tuple(slice(a, a + s) for a, s in zip(start, size, strict=True))]
    affine = image.affine.copy()
    affine[:3, 3] = image.affine[:3, :3] @ np.asarray(start) + image.affine[:3, 3]
    nibabel.save(nibabel.Nifti1Image(block.astype(np.float32), affine), str(target))
    return target


def _predict_with_cli_path(model: Path, record: dict[str, Any], *, out_dir: Path) -> Path:
    """What `fedmed predict MODEL IMAGE --out DIR` does, for one validation case of a run."""
    images = record["image"] if isinstance(record["image"], list) else [record["image"]]
    assert len(images) == 1, "one-modality cases only: a folder or dataset.json gives the others"
    trained = load_trained_model(model)
    (outcome,) = list(
        predict_cases(trained, input_cases([Path(images[0])], task=trained.config.task), out_dir=out_dir, device=CPU)
    )
    assert outcome.ok, outcome.error
    return Path(outcome.output)


def _assert_written_on_source_grid(written: Path, source: str | Path) -> None:
    shape, affine = _header(written)
    source_shape, source_affine = _header(source)
    assert shape == source_shape
    np.testing.assert_allclose(affine, source_affine, atol=1e-4)


def _brats_site_cases(root: Path) -> dict[str, list[Case]]:
    """BraTS cases grouped by where they were acquired (the ID in subject_id.txt: Brats18_<SOURCE>_...):
    CBICA, and the three TCIA centres together (one case each is too few for a site of its own)."""
    cases = cases_from_subfolders(root, modalities=["FLAIR", "T1"], label="GT_W", glob="case_*")
    groups: dict[str, list[Case]] = {"cbica": [], "tcia": []}
    for case in cases:
        subject = (case.image.parent / "subject_id.txt").read_text().split("Subject_id:")[-1].strip()
        groups["cbica" if subject.split("_")[1] == "CBICA" else "tcia"].append(case)
    return groups


@pytest.mark.slow
def test_brats_sites_by_source_two_modalities_on_full_volumes(shared_data: Path, tmp_path: Path) -> None:
    groups = _brats_site_cases(shared_data / "brats2018-10")
    assert [len(cases) for cases in groups.values()] == [7, 3]
    folders = {
        # One training and one validation case per site keeps the test to the path, not the accuracy.
        name: _site_folder(
            tmp_path / "sites" / name, name=name, cases=cases[:2], n_val=1, modality={0: "FLAIR", 1: "T1"}
        )
        for name, cases in groups.items()
    }
    config = _config(
        tmp_path,
        {
            "name": "brats",
            "task": {"kind": "segmentation", "spatial_dims": 3, "spacing": [3, 3, 3], "crop_foreground": True},
            "model": {"channels": [8, 16, 32]},
            "train": {"rounds": 1, "local_epochs": 1, "batch_size": 2, "patch_size": [32, 32, 32]},
            "inference": {"roi_size": [48, 48, 48], "overlap": 0.25},
            "evaluation": {"cross_site": False},
            "sites": [{"name": name, "path": str(path)} for name, path in folders.items()],
        },
    )
    result = simulate(config)

    assert result.config.task.in_channels == 2  # FLAIR + T1, taken from the data
    for name in folders:
        rows = list(csv.DictReader((result.run_dir.path / "sites" / name / "evaluation" / "global-cases.csv").open()))
        assert len(rows) == 1 and math.isfinite(float(rows[0]["dice"])), f"{name}: {rows}"
    checkpoint = torch.load(result.run_dir.path / "checkpoints" / "final.pt", map_location="cpu", weights_only=False)
    model = build_model(result.config.task, result.config.model)
    model.load_state_dict(checkpoint["state_dict"])
    site = open_scan_site(folders["tcia"], config=result.config, cache_dir=None)
    inferer = sliding_window_inferer(roi_size=site.val.roi_size, inference=site.val.inference, device=CPU)
    labelmap = predict_labelmap(model.eval(), site.val, 0, inferer=inferer, device=CPU)
    # LPS at 1 mm, cropped to the brain and resampled to 3 mm for the network: all undone.
    assert tuple(labelmap.shape) == (1, 240, 240, 155)
    _assert_on_source_grid(labelmap, _first_image(site.val.records[0]))


def _train_one_epoch(site: ScanSite, config: RunConfig) -> torch.nn.Module:
    torch.manual_seed(config.seed)
    model = build_model(config.task, config.model)
    task = get_task(config.task)
    train_local(model, site.train, task=task, train=config.train, epochs=1, seed=config.seed, device=CPU)
    return model.eval()


@pytest.mark.slow
def test_ms_lesion_four_modalities_train_and_slide(shared_data: Path, tmp_path: Path) -> None:
    root = shared_data / "ms-lesion-3"
    # "T1_*" and not "T1*": the latter would also match T1POST.
    modalities = ["FLAIR_*", "T1_*", "T1POST_*", "T2_*"]
    cases = cases_from_subfolders(root, modalities=modalities, label="GOLD_STANDARD_*", glob="patient*")[:2]
    folder = _site_folder(
        tmp_path / "ms", name="ms", cases=cases, n_val=1, modality={0: "FLAIR", 1: "T1", 2: "T1POST", 3: "T2"}
    )
    config = _config(
        tmp_path,
        {
            "task": {"kind": "segmentation", "spatial_dims": 3, "spacing": [3, 3, 3], "in_channels": 4},
            "model": {"channels": [8, 16, 32]},
            "train": {"batch_size": 2, "patch_size": [32, 32, 32], "samples_per_volume": 4},
            "inference": {"roi_size": [64, 64, 64], "overlap": 0.25},
        },
    )
    site = open_scan_site(folder, config=config, cache_dir=None)
    assert site.channels == 4
    assert site.train[0]["image"].shape == (4, 32, 32, 32)

    model = _train_one_epoch(site, config)
    _, rows = evaluate_segmentation_volumes(model, site.val, task=config.task, device=CPU)

    assert [row["case"] for row in rows] == [cases[0].image.name]
    assert 0.0 <= rows[0]["dice"] <= 1.0
    inferer = sliding_window_inferer(roi_size=site.val.roi_size, inference=site.val.inference, device=CPU)
    labelmap = predict_labelmap(model, site.val, 0, inferer=inferer, device=CPU)
    _assert_on_source_grid(labelmap, cases[0].image)  # 182 x 218 x 182, LAS


def test_spleen_ct_window_prediction_written_on_the_original_grid(shared_data: Path, tmp_path: Path) -> None:
    root = shared_data / "msd-spleen-ct-1"
    case = Case(image=root / "imagesTr" / "spleen_8.nii.gz", label=root / "labelsTr" / "spleen_8.nii.gz")
    # One CT only: it is both the training and the validation case (dataset.json warns; fine for the path).
    folder = tmp_path / "spleen"
    folder.mkdir()
    write_manifest(
        folder,
        name="spleen",
        labels={0: "background", 1: "spleen"},
        modality={0: "CT"},
        training=[case],
        validation=[case],
        tensor_image_size="3D",
    )
    config = _config(
        tmp_path,
        {
            # 0.785 x 0.785 x 7.5 mm resampled to 3 x 3 x 6 mm: 134 x 134 x 40 voxels for the network.
            "task": {"kind": "segmentation", "spatial_dims": 3, "spacing": [3, 3, 6], "intensity": "ct_window"},
            "normalization": {"window_level": 40, "window_width": 400},
            "model": {"channels": [8, 16, 32]},
            "train": {"rounds": 1, "batch_size": 2, "patch_size": [64, 64, 32], "samples_per_volume": 4},
            "inference": {"overlap": 0.25},
            "evaluation": {"cross_site": False},
            "sites": [{"name": "spleen", "path": str(folder)}],
        },
    )
    site = open_scan_site(folder, config=config, cache_dir=None)
    patch = site.train[0]["image"]
    assert patch.shape == (1, 64, 64, 32) and float(patch.min()) >= 0.0 and float(patch.max()) <= 1.0  # HU window

    result = simulate(config)
    written = _predict_with_cli_path(result.run_dir.path, {"image": str(case.image)}, out_dir=tmp_path / "predicted")
    shape, affine = _header(written)
    source_shape, source_affine = _header(case.image)
    assert shape == source_shape == (512, 512, 32)
    np.testing.assert_allclose(affine, source_affine, atol=1e-4)
    rows = list(csv.DictReader((result.run_dir.path / "sites" / "spleen" / "evaluation" / "global-cases.csv").open()))
    dice = _dice(torch.from_numpy(np.asarray(nibabel.load(str(written)).dataobj))[None], str(case.label), num_classes=2)
    assert dice == pytest.approx(float(rows[0]["dice"]), abs=1e-5)

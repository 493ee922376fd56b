"""Multi-modal cases: MSD image lists and 4D NIfTI as channels, checked, loaded and federated."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from data_helpers import blob_volume, find_problem, save_nifti
from nibabel.orientations import axcodes2ornt, ornt_transform

from fedmed.config import SiteDrift, TaskConfig
from fedmed.data import (
    Case,
    DataValidationError,
    cases_from_subfolders,
    clear_site_cache,
    load_site,
    read_manifest,
    split_into_sites,
    validate_site,
    write_manifest,
)
from fedmed.data.io import read_image
from fedmed.data.problems import DataProblem

SHAPE = (8, 8, 8)
MODALITIES = {0: "FLAIR", 1: "T1"}


def seg3d(**changes: object) -> TaskConfig:
    settings: dict[str, object] = {"kind": "segmentation", "spatial_dims": 3, "image_size": list(SHAPE)}
    settings.update(changes)
    return TaskConfig(**settings)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    clear_site_cache()


def modalities_of(seed: int, shape: tuple[int, ...] = SHAPE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FLAIR-like and T1-like volumes of one case (different contrast and scale) and its label."""
    flair, label = blob_volume(shape, seed=seed)
    t1 = (100.0 - 40.0 * flair).astype(np.float32)
    return flair, t1, label


def write_msd_site(
    site: Path,
    *,
    count: int = 3,
    modality: dict[int, str] | None = None,
    affine: np.ndarray | None = None,
    codes: str = "RAS",
) -> Path:
    """A site whose cases list two modality files each ("image": [flair, t1]), stored in orientation `codes`."""
    transform = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(codes))
    base = np.diag([1.0, 1.2, 1.5, 1.0]) if affine is None else affine
    cases = []
    for index in range(count):
        flair, t1, label = modalities_of(index)
        paths = []
        for name, array in (("flair", flair), ("t1", t1), ("label", label)):
            folder = site / ("labelsTr" if name == "label" else "imagesTr")
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / (f"c{index}.nii.gz" if name == "label" else f"c{index}_{name}.nii.gz")
            nib.save(nib.Nifti1Image(array, base).as_reoriented(transform), str(path))
            paths.append(path)
        cases.append(Case(image=paths[0], label=paths[2], other_modalities=(paths[1],)))
    write_manifest(
        site,
        name=site.name,
        labels={0: "bg", 1: "tumour"},
        modality=MODALITIES if modality is None else modality,
        training=cases[1:],
        validation=cases[:1],
        tensor_image_size="3D",
    )
    return site


def write_4d_site(site: Path, *, channels: list[int], modality: dict[int, str] | str = "MRI") -> Path:
    """One 4D NIfTI per case with its channels last, as MSD BrainTumour and Prostate store them."""
    cases = []
    for index, count in enumerate(channels):
        flair, _t1, label = modalities_of(index)
        stack = np.stack([flair * (channel + 1) + channel for channel in range(count)], axis=-1)
        image = save_nifti(site / "imagesTr" / f"c{index}.nii.gz", stack.astype(np.float32))
        cases.append(Case(image=image, label=save_nifti(site / "labelsTr" / f"c{index}.nii.gz", label)))
    write_manifest(
        site,
        name=site.name,
        labels={0: "bg", 1: "tumour"},
        modality=modality,
        training=cases[1:],
        validation=cases[:1],
        tensor_image_size="4D",
    )
    return site


def errors(site: Path, task: TaskConfig | None = None) -> list[DataProblem]:
    return validate_site(site, task=task).errors


def test_msd_image_list_validates_and_loads_as_channels_in_order(tmp_path: Path) -> None:
    site = write_msd_site(tmp_path / "msd", codes="LPS")
    report = validate_site(site, task=seg3d())
    assert report.problems == [], report.summary()
    assert report.channels == 2 and "channels per case: 2" in report.summary()
    assert report.image_shapes == {SHAPE: 3}
    raw = load_site(site, task=seg3d(intensity="none", in_channels=2))
    flair, t1, label = modalities_of(1)
    sample = raw.train[0]
    assert sample["image"].shape == (2, *SHAPE) and sample["label"].shape == (1, *SHAPE)
    # Stored LPS, loaded RAS: both channels and the label are reoriented together, in the listed order.
    torch.testing.assert_close(sample["image"][0], torch.from_numpy(flair))
    torch.testing.assert_close(sample["image"][1], torch.from_numpy(t1))
    np.testing.assert_array_equal(sample["label"][0].numpy(), label)
    normalized = load_site(site, task=seg3d(intensity="zscore")).train[0]["image"]
    flat = normalized.reshape(2, -1)
    torch.testing.assert_close(flat.mean(dim=1), torch.zeros(2), atol=1e-4, rtol=0)
    torch.testing.assert_close(flat.std(dim=1, unbiased=False), torch.ones(2), atol=1e-4, rtol=0)


def test_4d_nifti_with_channels_last_reads_channel_first(tmp_path: Path) -> None:
    flair, _t1, _label = modalities_of(0)
    stack = np.stack([flair, flair * 2 + 1, -flair], axis=-1)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    path = save_nifti(tmp_path / "four_d.nii.gz", stack, affine)
    image = read_image(path)
    assert tuple(image.shape) == (3, *SHAPE)
    for channel in range(3):
        np.testing.assert_array_equal(image[channel].numpy(), stack[..., channel])
    np.testing.assert_allclose(image.affine.numpy(), affine)


def test_4d_nifti_site_loads_as_c_channels(tmp_path: Path) -> None:
    site = write_4d_site(tmp_path / "four", channels=[3, 3, 3], modality={0: "FLAIR", 1: "T1", 2: "T2"})
    report = validate_site(site, task=seg3d())
    assert report.problems == [] and report.channels == 3
    sample = load_site(site, task=seg3d(intensity="none")).train[0]
    assert sample["image"].shape == (3, *SHAPE)
    flair, _t1, _label = modalities_of(1)
    torch.testing.assert_close(sample["image"][2], torch.from_numpy(flair * 3 + 2))


def test_modality_on_another_grid_is_refused_naming_the_file(tmp_path: Path) -> None:
    site = write_msd_site(tmp_path / "shape")
    smaller = site / "imagesTr" / "c1_t1.nii.gz"
    save_nifti(smaller, np.zeros((8, 8, 6), dtype=np.float32), np.diag([1.0, 1.2, 1.5, 1.0]))
    problem = find_problem(errors(site), path=smaller, words="modality shape (8, 8, 6) differs")
    assert "c1_flair.nii.gz" in problem.message and "training[0], modality 1" in problem.message
    assert "co-register" in problem.fix
    shifted = np.diag([1.0, 1.2, 1.5, 1.0])
    shifted[2, 3] = 0.5
    save_nifti(smaller, np.zeros(SHAPE, dtype=np.float32), shifted)
    problem = find_problem(errors(site), path=smaller, words="modality affine differs")
    assert "0.5 mm" in problem.message and "c1_flair.nii.gz" in problem.fix


def test_missing_modality_file_names_the_modality(tmp_path: Path) -> None:
    site = write_msd_site(tmp_path / "missing")
    (site / "imagesTr" / "c2_t1.nii.gz").unlink()
    problem = find_problem(errors(site), path=site / "imagesTr" / "c2_t1.nii.gz", words="image file not found")
    assert "training[1], modality 1" in problem.message


def test_nan_in_a_later_modality_names_that_file(tmp_path: Path) -> None:
    site = write_msd_site(tmp_path / "nan")
    _flair, t1, _label = modalities_of(2)
    t1[0, 1, 2] = np.nan
    path = save_nifti(site / "imagesTr" / "c2_t1.nii.gz", t1, np.diag([1.0, 1.2, 1.5, 1.0]))
    find_problem(errors(site), path=path, words="1 NaN/Inf voxel")


def test_channel_count_must_agree_across_cases(tmp_path: Path) -> None:
    site = write_4d_site(tmp_path / "mixed", channels=[2, 2, 3], modality={0: "FLAIR", 1: "T1"})
    problem = find_problem(errors(site), path=site / "imagesTr" / "c2.nii.gz", words="has 3 channel(s)")
    assert "training[0] has 2" in problem.message


def test_declared_modality_names_must_match_the_channels(tmp_path: Path) -> None:
    site = write_msd_site(tmp_path / "names", modality={0: "FLAIR"})
    problem = find_problem(errors(site), path=site / "dataset.json", words="'modality' names 1 channel(s) (FLAIR)")
    assert '"0": "FLAIR", "1": "modality1"' in problem.fix
    # No names at all is allowed: the channel count comes from the images.
    raw = json.loads((site / "dataset.json").read_text())
    del raw["modality"]
    (site / "dataset.json").write_text(json.dumps(raw))
    assert validate_site(site).ok


def test_task_in_channels_must_match_the_data(tmp_path: Path) -> None:
    site = write_msd_site(tmp_path / "inch")
    problem = find_problem(
        errors(site, seg3d(in_channels=1)), path=site / "imagesTr" / "c1_flair.nii.gz", words="task.in_channels is 1"
    )
    assert "set task.in_channels = 2" in problem.fix
    assert validate_site(site, task=seg3d(in_channels=2)).ok
    assert validate_site(site, task=seg3d(in_channels=None)).ok
    with pytest.raises(DataValidationError, match=r"task\.in_channels = 2"):
        load_site(site, task=seg3d(in_channels=3))


@pytest.mark.parametrize("mode", ["site_zscore", "site_percentile", "nyul"])
def test_site_level_intensity_is_single_channel_only(tmp_path: Path, mode: str) -> None:
    site = write_msd_site(tmp_path / "site-level")
    problem = find_problem(errors(site, seg3d(intensity=mode)), path=site / "dataset.json", words=f"'{mode}'")
    assert "2 channels" in problem.message and "'zscore' or 'percentile'" in problem.fix
    one = write_4d_site(tmp_path / "one", channels=[1, 1])
    assert validate_site(one, task=seg3d(intensity=mode)).ok


def _subfolder_cases(root: Path, count: int) -> None:
    """The BraTS demo layout: root/case_N/FLAIR.nii.gz, T1.nii.gz, GT_W.nii.gz; stored LPS."""
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    for index in range(count):
        flair, t1, label = modalities_of(index)
        for name, array in (("FLAIR", flair), ("T1", t1), ("GT_W", label.astype(np.float32))):
            save_nifti(root / f"case_{index}" / f"{name}.nii.gz", array, affine)
    (root / "manifest.csv").write_text("file,bytes\n")  # files beside the case folders are not cases


def test_cases_from_subfolders_pairs_modalities_and_reports_every_missing_file(tmp_path: Path) -> None:
    _subfolder_cases(tmp_path / "brats", 3)
    cases = cases_from_subfolders(tmp_path / "brats", modalities=["FLAIR", "T1.nii.gz"], label="GT_*")
    assert [case.image.parent.name for case in cases] == ["case_0", "case_1", "case_2"]
    assert [path.name for path in cases[0].images] == ["FLAIR.nii.gz", "T1.nii.gz"]
    assert cases[0].label == (tmp_path / "brats" / "case_0" / "GT_W.nii.gz").resolve()
    (tmp_path / "brats" / "case_0" / "T1.nii.gz").unlink()
    (tmp_path / "brats" / "case_2" / "GT_W.nii.gz").unlink()
    save_nifti(tmp_path / "brats" / "case_1" / "FLAIR.nii", np.zeros(SHAPE, dtype=np.float32))
    with pytest.raises(DataValidationError) as caught:
        cases_from_subfolders(tmp_path / "brats", modalities=["FLAIR", "T1.nii.gz"], label="GT_*")
    problems = caught.value.problems
    assert len(problems) == 3
    find_problem(problems, path=tmp_path / "brats" / "case_0" / "T1.nii.gz", words="modality 'T1.nii.gz' file not")
    find_problem(problems, path=tmp_path / "brats" / "case_1" / "FLAIR.nii*", words="matches 2 files in case_1")
    find_problem(problems, path=tmp_path / "brats" / "case_2" / "GT_*", words="label file not found in case_2")


def test_split_into_sites_writes_one_file_per_modality_and_a_valid_list(tmp_path: Path) -> None:
    _subfolder_cases(tmp_path / "brats", 4)
    cases = cases_from_subfolders(tmp_path / "brats", modalities=["FLAIR", "T1"], label="GT_W")
    drifts = [SiteDrift(name="a"), SiteDrift(name="b", intensity_scale=2.0)]
    entries = split_into_sites(
        cases,
        drifts=drifts,
        out_dir=tmp_path / "sites",
        image_size=None,
        binarize_labels=True,
        val_fraction=0.5,
        seed=0,
        modality_names=MODALITIES,
    )
    for entry in entries:
        names = sorted(path.name for path in (entry.path / "imagesTr").iterdir())
        assert names == [f"{entry.name}_{n:03d}_{c:04d}.nii.gz" for n in range(2) for c in range(2)]
        assert sorted(path.name for path in (entry.path / "labelsTr").iterdir()) == [
            f"{entry.name}_{n:03d}.nii.gz" for n in range(2)
        ]
        raw = json.loads((entry.path / "dataset.json").read_text())
        assert raw["modality"] == {"0": "FLAIR", "1": "T1"}
        assert raw["training"][0]["image"] == [
            f"./imagesTr/{entry.name}_001_0000.nii.gz",
            f"./imagesTr/{entry.name}_001_0001.nii.gz",
        ]
        report = validate_site(entry.path, task=seg3d(in_channels=2))
        assert report.problems == [] and report.channels == 2, report.summary()
        written = nib.load(str(read_manifest(entry.path).training[0].other_modalities[0]))
        assert written.shape == SHAPE and "".join(nib.aff2axcodes(written.affine)) == "RAS"
    # Every modality is drifted: site b's intensity_scale doubles FLAIR and T1 alike.
    for entry, scale in zip(entries, (1.0, 2.0)):
        data = load_site(entry.path, task=seg3d(intensity="none"))
        for sample in data.train + data.val:
            flair, t1 = sample["image"]
            # T1 = 100 - 40 * FLAIR before drift; the scale multiplies both, so the relation scales with it.
            torch.testing.assert_close(t1, scale * 100.0 - 40.0 * flair, atol=1e-3, rtol=1e-5)


def test_split_into_sites_refuses_modality_names_that_miss_a_channel(tmp_path: Path) -> None:
    _subfolder_cases(tmp_path / "brats", 2)
    cases = cases_from_subfolders(tmp_path / "brats", modalities=["FLAIR", "T1"], label="GT_W")

    def split(names: dict[int, str]) -> None:
        split_into_sites(
            cases,
            drifts=[SiteDrift(name="a")],
            out_dir=tmp_path / "out",
            image_size=None,
            binarize_labels=True,
            val_fraction=0.5,
            seed=0,
            modality_names=names,
        )

    with pytest.raises(DataValidationError, match="2 image channel"):
        split({0: "FLAIR"})
    assert not (tmp_path / "out" / "a").exists()
    with pytest.raises(ValueError, match="channel indices"):
        split({1: "T1"})


def test_brats_demo_becomes_two_channel_sites(shared_dataset: Callable[[str], Path], tmp_path: Path) -> None:
    root = shared_dataset("brats2018-10/case_0").parent
    cases = cases_from_subfolders(root, modalities=["FLAIR", "T1"], label="GT_W")
    assert len(cases) == 10 and all(len(case.images) == 2 for case in cases)
    entries = split_into_sites(
        cases[:4],
        drifts=[SiteDrift(name="s1"), SiteDrift(name="s2", intensity_scale=1.5)],
        out_dir=tmp_path,
        image_size=[24, 24, 16],
        binarize_labels=True,
        val_fraction=0.5,
        seed=0,
        modality_names=MODALITIES,
    )
    task = TaskConfig(kind="segmentation", spatial_dims=3, image_size=[24, 24, 16], in_channels=2)
    for entry in entries:
        report = validate_site(entry.path, task=task)
        assert report.problems == [] and report.channels == 2, report.summary()
        assert load_site(entry.path, task=task).train[0]["image"].shape == (2, 24, 24, 16)

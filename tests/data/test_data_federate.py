"""split_into_sites: real cases dealt onto drifted sites, geometry and scale factors kept."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from data_helpers import blob_volume
from nibabel.orientations import axcodes2ornt, ornt_transform

from fedmed.config import SiteDrift, SiteEntry, TaskConfig
from fedmed.data import (
    DataOutputError,
    DataValidationError,
    cases_from_folder_pairs,
    load_site,
    read_manifest,
    split_into_sites,
    validate_site,
)

IXI_DRIFTS = [
    SiteDrift(name="hh-1"),
    SiteDrift(name="hh-2", intensity_scale=1.3, noise_std=0.02),
    SiteDrift(name="hh-3", bias_field=0.2, blur_sigma=0.7),
]

MASKS = {"image_size": None, "binarize_labels": True, "val_fraction": 0.5, "seed": 0}


def ixi_label_name(image_name: str) -> str:
    return image_name.replace("_T1.nii.gz", "_T1_DLMUSE.nii.gz")


@pytest.fixture(scope="module")
def ixi_sites(shared_dataset: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> list[SiteEntry]:
    root = shared_dataset("ixi-hh-t1-12/t1").parent
    cases = cases_from_folder_pairs(
        root / "t1", root / "labels", image_glob="*_T1.nii.gz", label_for_image=ixi_label_name
    )
    assert len(cases) == 12
    return split_into_sites(
        cases,
        drifts=IXI_DRIFTS,
        out_dir=tmp_path_factory.mktemp("ixi"),
        image_size=[32, 32, 32],
        binarize_labels=True,
        val_fraction=0.25,
        seed=0,
    )


def test_ixi_becomes_three_valid_brain_mask_sites(ixi_sites: list[SiteEntry]) -> None:
    task = TaskConfig(kind="segmentation", spatial_dims=3, image_size=[32, 32, 32])
    assert [entry.name for entry in ixi_sites] == ["hh-1", "hh-2", "hh-3"]
    sources: list[str] = []
    for entry in ixi_sites:
        report = validate_site(entry.path, task=task)
        assert report.problems == [], report.summary()
        assert report.counts == {"training": 3, "validation": 1}
        assert set(report.label_counts) == {0, 1}
        data = load_site(entry.path, task=task)
        assert (data.num_train, data.num_val) == (3, 1)
        brain = float(np.mean([sample["label"].float().mean() for sample in data.train]))
        assert 0.08 < brain < 0.3  # a brain mask, not an empty or a full volume
        manifest = read_manifest(entry.path)
        image = nib.load(str(manifest.training[0].image))
        assert image.shape == (32, 32, 32) and "".join(nib.aff2axcodes(image.affine)) == "RAS"
        assert manifest.labels == {0: "background", 1: "foreground"}
        sources.extend(path.name for path in (entry.path / "imagesTr").iterdir())
    assert len(sources) == 12


def test_ixi_scale_factors_reach_the_written_images(ixi_sites: list[SiteEntry], shared_data: Path) -> None:
    raw = nib.load(str(next((shared_data / "ixi-hh-t1-12" / "t1").glob("*_T1.nii.gz"))))
    assert np.asarray(raw.dataobj.get_unscaled()).max() <= 255  # stored as uint8 ...
    written = [np.asarray(nib.load(str(path)).dataobj) for path in (ixi_sites[0].path / "imagesTr").iterdir()]
    assert max(float(volume.max()) for volume in written) > 500  # ... but scanner units after scl_slope


def _real_like_cases(folder: Path, count: int) -> list:
    """uint8 volumes with a scale factor, stored PSR like IXI."""
    transform = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt("PSR"))
    (folder / "img").mkdir(parents=True)
    (folder / "lab").mkdir()
    for index in range(count):
        image, label = blob_volume((16, 14, 12), seed=index)
        affine = np.diag([2.0, 2.0, 2.0, 1.0])
        stored = nib.Nifti1Image(np.clip(image * 100, 0, 255).astype(np.uint8), affine).as_reoriented(transform)
        stored.header.set_slope_inter(10.0, 0.0)
        nib.save(stored, str(folder / "img" / f"s{index}.nii.gz"))
        stored_label = nib.Nifti1Image(label * 3, affine).as_reoriented(transform)
        nib.save(stored_label, str(folder / "lab" / f"s{index}.nii.gz"))
    return cases_from_folder_pairs(folder / "img", folder / "lab")


def test_split_is_deterministic_keeps_label_classes_and_drifts_images_only(tmp_path: Path) -> None:
    cases = _real_like_cases(tmp_path / "src", 6)
    drifts = [SiteDrift(name="a"), SiteDrift(name="b", intensity_scale=2.0)]
    options = {"drifts": drifts, "image_size": None, "binarize_labels": False, "val_fraction": 0.34, "seed": 5}
    first = split_into_sites(cases, out_dir=tmp_path / "one", **options)  # type: ignore[arg-type]
    again = split_into_sites(cases, out_dir=tmp_path / "two", **options)  # type: ignore[arg-type]
    for left, right in zip(first, again):
        for path in (left.path / "imagesTr").iterdir():
            assert path.read_bytes() == (right.path / "imagesTr" / path.name).read_bytes()
    manifest = read_manifest(first[1].path)
    assert len(manifest.training) == 2 and len(manifest.validation) == 1
    assert manifest.labels == {0: "background", 3: "label_3"}
    label = nib.load(str(manifest.training[0].label))  # type: ignore[arg-type]
    assert label.get_data_dtype() == np.uint8 and set(np.unique(np.asarray(label.dataobj))) == {0, 3}
    assert label.shape == (16, 14, 12) and "".join(nib.aff2axcodes(label.affine)) == "RAS"
    image = np.asarray(nib.load(str(manifest.training[0].image)).dataobj)
    assert image.dtype == np.float32 and image.max() > 255  # scale factor applied (x10), then drift (x2)
    task = TaskConfig(kind="segmentation", spatial_dims=3, num_classes=4, image_size=[16, 14, 12])
    assert validate_site(first[0].path, task=task).problems == []


def test_split_refuses_bad_requests(tmp_path: Path) -> None:
    cases = _real_like_cases(tmp_path / "src", 3)
    with pytest.raises(ValueError, match="cannot fill 2 site"):
        split_into_sites(cases, drifts=[SiteDrift(name="a"), SiteDrift(name="b")], out_dir=tmp_path / "out", **MASKS)
    (tmp_path / "out" / "a").mkdir(parents=True)
    (tmp_path / "out" / "a" / "keep.txt").write_text("x")
    with pytest.raises(DataOutputError, match="overwrite"):
        split_into_sites(cases, drifts=[SiteDrift(name="a")], out_dir=tmp_path / "out", **MASKS)
    (tmp_path / "src" / "lab" / "s1.nii.gz").unlink()
    with pytest.raises(DataValidationError, match=r"label file for s1.nii.gz not found"):
        cases_from_folder_pairs(tmp_path / "src" / "img", tmp_path / "src" / "lab")


def test_misaligned_label_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    cases = _real_like_cases(tmp_path / "src", 2)
    label_path = cases[1].label
    shifted = nib.load(str(label_path))
    affine = shifted.affine.copy()
    affine[0, 3] += 2.0
    nib.save(nib.Nifti1Image(np.asarray(shifted.dataobj), affine), str(label_path))
    with pytest.raises(DataValidationError, match="label affine differs") as caught:
        split_into_sites(cases, drifts=[SiteDrift(name="a")], out_dir=tmp_path / "out", **MASKS)
    assert str(label_path) in str(caught.value)
    assert not (tmp_path / "out" / "a").exists()

"""load_site: scale factors, orientation, resampling, label mapping, intensity modes, 2D inputs, cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from data_helpers import blob_volume, save_nifti
from nibabel.orientations import axcodes2ornt, ornt_transform
from PIL import Image

from fedmed.config import TaskConfig
from fedmed.data import Case, DataValidationError, clear_site_cache, load_site, write_manifest


def seg3d(**changes: object) -> TaskConfig:
    settings: dict[str, object] = {
        "kind": "segmentation",
        "spatial_dims": 3,
        "image_size": [12, 12, 12],
        "intensity": "none",
    }
    settings.update(changes)
    return TaskConfig(**settings)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    clear_site_cache()


def test_nifti_scale_factor_is_applied(tmp_path: Path, write_site) -> None:  # type: ignore[no-untyped-def]
    raw = np.arange(12 * 12 * 12, dtype=np.int64).reshape(12, 12, 12) % 200
    empty = np.zeros_like(raw, dtype=np.uint8)
    site = write_site({"a": raw.astype(np.uint8), "b": raw.astype(np.uint8)}, {"a": empty, "b": empty})
    for path in (site / "imagesTr").iterdir():
        image = nib.load(str(path))
        scaled = nib.Nifti1Image(np.asarray(image.dataobj).astype(np.uint8), image.affine)
        scaled.header.set_data_dtype(np.uint8)
        scaled.header.set_slope_inter(2.5, 0.0)
        nib.save(scaled, str(path))
        assert nib.load(str(path)).dataobj.slope == 2.5
    data = load_site(site, task=seg3d())
    np.testing.assert_allclose(data.train[0]["image"][0].numpy(), raw * 2.5)


def test_orientation_is_normalised_to_ras(tmp_path: Path) -> None:
    image, label = blob_volume((12, 10, 8))
    image = image + np.arange(12)[:, None, None] * 0.1  # asymmetric along every axis
    image = (image + np.arange(10)[None, :, None] * 0.01 + np.arange(8)[None, None, :] * 0.001).astype(np.float32)
    affine_ras = np.diag([1.5, 1.5, 2.0, 1.0])
    loaded = {}
    for codes in ("RAS", "LPS", "PSR"):
        site = tmp_path / codes
        transform = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(codes))
        oriented = nib.Nifti1Image(image, affine_ras).as_reoriented(transform)
        oriented_label = nib.Nifti1Image(label, affine_ras).as_reoriented(transform)
        assert "".join(nib.aff2axcodes(oriented.affine)) == codes
        cases = []
        for name in ("a", "b"):
            for kind, volume in (("images", oriented), ("labels", oriented_label)):
                (site / kind).mkdir(parents=True, exist_ok=True)
                nib.save(volume, str(site / kind / f"{name}.nii.gz"))
            cases.append(Case(image=site / "images" / f"{name}.nii.gz", label=site / "labels" / f"{name}.nii.gz"))
        write_manifest(
            site,
            name=codes,
            labels={0: "bg", 1: "fg"},
            modality="MRI",
            training=cases[:1],
            validation=cases[1:],
            tensor_image_size="3D",
        )
        loaded[codes] = load_site(site, task=seg3d(image_size=[12, 10, 8])).train[0]
    assert not np.array_equal(np.asarray(nib.load(str(tmp_path / "PSR/images/a.nii.gz")).dataobj), image)
    for codes in ("LPS", "PSR"):
        torch.testing.assert_close(loaded[codes]["image"], loaded["RAS"]["image"])
        torch.testing.assert_close(loaded[codes]["label"], loaded["RAS"]["label"])
    torch.testing.assert_close(loaded["RAS"]["image"][0], torch.from_numpy(image))


def test_resampling_to_image_size_keeps_labels_as_classes(write_site) -> None:  # type: ignore[no-untyped-def]
    image, label = blob_volume((20, 16, 24))
    label = label * 2  # class 2 only: an averaged label would produce 1s
    site = write_site({"a": image, "b": image}, {"a": label, "b": label}, labels_declared={0: "bg", 1: "x", 2: "y"})
    data = load_site(site, task=seg3d(image_size=[10, 8, 12], num_classes=3))
    sample = data.train[0]
    assert sample["image"].shape == (1, 10, 8, 12) and sample["label"].shape == (1, 10, 8, 12)
    assert set(sample["label"].unique().tolist()) == {0, 2}
    # Area averaging: the image mean is preserved when shrinking by whole factors.
    assert float(sample["image"].mean()) == pytest.approx(float(image.mean()), rel=1e-4)
    upsampled = load_site(site, task=seg3d(image_size=[40, 32, 48], num_classes=3)).train[0]
    assert upsampled["image"].shape == (1, 40, 32, 48)
    assert set(upsampled["label"].unique().tolist()) == {0, 2}


def test_label_mapping_binarises_or_keeps_classes(write_site) -> None:  # type: ignore[no-untyped-def]
    image, label = blob_volume()
    label = label.copy()
    label[:2] = 3
    declared = {0: "bg", 1: "a", 3: "b"}
    site = write_site({"a": image, "b": image}, {"a": label, "b": label}, labels_declared=declared)
    binary = load_site(site, task=seg3d(binarize_labels=True)).train[0]["label"]
    assert binary.dtype == torch.int64 and set(binary.unique().tolist()) == {0, 1}
    assert int(binary.sum()) == int((label > 0).sum())
    kept = load_site(site, task=seg3d(num_classes=4)).train[0]["label"]
    np.testing.assert_array_equal(kept[0].numpy(), label)


def test_intensity_modes(write_site) -> None:  # type: ignore[no-untyped-def]
    image, label = blob_volume()
    image = image * 300.0 + 1000.0
    image[0, 0, 0] = 1e6  # one hot voxel: percentile must ignore it, min-max cannot
    site = write_site({"a": image, "b": image}, {"a": label, "b": label})
    modes = ("zscore", "percentile", "minmax", "none")
    out = {mode: load_site(site, task=seg3d(intensity=mode)).train[0]["image"] for mode in modes}
    np.testing.assert_allclose(out["none"][0].numpy(), image)
    assert float(out["zscore"].mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(out["zscore"].std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
    assert float(out["minmax"].min()) == 0.0 and float(out["minmax"].max()) == pytest.approx(1.0)
    assert float(out["percentile"].min()) == 0.0 and float(out["percentile"].max()) == 1.0
    low, high = np.percentile(image, [1, 99])
    inside = (image > low) & (image < high)
    expected = (image - low) / (high - low)
    np.testing.assert_allclose(out["percentile"][0].numpy()[inside], expected[inside], rtol=1e-4, atol=1e-5)
    # The outlier squashes min-max into a sliver, not the percentile scaling.
    assert float(out["minmax"].median()) < 0.01 < 0.05 < float(out["percentile"].median())


def test_constant_image_normalises_to_zeros_not_nan(write_site) -> None:  # type: ignore[no-untyped-def]
    image = np.full((12, 12, 12), 7.0, dtype=np.float32)
    label = np.zeros((12, 12, 12), dtype=np.uint8)
    site = write_site({"a": image, "b": image}, {"a": label, "b": label})
    for mode in ("zscore", "percentile", "minmax"):
        loaded = load_site(site, task=seg3d(intensity=mode)).train[0]["image"]
        assert torch.all(loaded == 0), mode


def test_2d_nifti_flat_or_with_singleton_axis_and_png_load_alike(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    array = rng.integers(0, 256, size=(10, 14), dtype=np.uint8)
    label = (array > 128).astype(np.uint8)
    site = tmp_path / "site2d"
    cases = []
    for name, suffix in (("flat", ".nii.gz"), ("slab", ".nii.gz"), ("png", ".png")):
        image_path, label_path = site / "imagesTr" / f"{name}{suffix}", site / "labelsTr" / f"{name}{suffix}"
        if name == "png":
            image_path.parent.mkdir(parents=True, exist_ok=True)
            label_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(image_path)
            Image.fromarray(label).save(label_path)
        else:
            shape = array.shape if name == "flat" else (*array.shape, 1)
            save_nifti(image_path, array.reshape(shape))
            save_nifti(label_path, label.reshape(shape))
        cases.append(Case(image=image_path, label=label_path))
    write_manifest(
        site,
        name="s",
        labels={0: "bg", 1: "fg"},
        modality="XR",
        training=cases,
        validation=cases[:1],
        tensor_image_size="2D",
    )
    task = TaskConfig(kind="segmentation", spatial_dims=2, image_size=[10, 14], intensity="none")
    samples = load_site(site, task=task).train
    for sample in samples:
        assert sample["image"].shape == (1, 10, 14)
        np.testing.assert_array_equal(sample["image"][0].numpy(), array.astype(np.float32))
        np.testing.assert_array_equal(sample["label"][0].numpy(), label)


def test_classification_and_enhancement_samples(tmp_path: Path, write_site) -> None:  # type: ignore[no-untyped-def]
    image, _ = blob_volume()
    site = write_site(
        {"a": image, "b": image, "c": image}, {"a": 1, "b": 0, "c": 1}, name="cls", labels_declared={0: "n", 1: "p"}
    )
    data = load_site(site, task=TaskConfig(kind="classification", spatial_dims=3, image_size=[8, 8, 8]))
    assert [int(s["label"]) for s in data.train] == [0, 1] and int(data.val[0]["label"]) == 1
    assert data.train[0]["label"].dtype == torch.int64 and data.train[0]["label"].shape == ()
    enhancement = write_site({"a": image, "b": image}, name="enh")
    enhancement_task = TaskConfig(kind="enhancement", spatial_dims=3, image_size=[12, 12, 12])
    sample = load_site(enhancement, task=enhancement_task).train[0]
    assert set(sample) == {"image"} and sample["image"].shape == (1, 12, 12, 12)


def test_cache_returns_same_tensors_until_the_manifest_changes(write_site) -> None:  # type: ignore[no-untyped-def]
    image, label = blob_volume()
    site = write_site({"a": image, "b": image}, {"a": label, "b": label})
    task = seg3d()
    first = load_site(site, task=task)
    first.train.clear()  # callers may reshuffle or trim their lists; the cache must not care
    second = load_site(site, task=task)
    assert second.num_train == 1
    assert second.val[0]["image"] is load_site(site, task=task).val[0]["image"]
    assert load_site(site, task=seg3d(intensity="minmax")).val[0]["image"] is not second.val[0]["image"]
    manifest = site / "dataset.json"
    stat = manifest.stat()
    manifest.write_text(json.dumps(json.loads(manifest.read_text())) + "\n")
    os.utime(manifest, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert load_site(site, task=task).val[0]["image"] is not second.val[0]["image"]
    third = load_site(site, task=task)
    clear_site_cache()
    assert load_site(site, task=task).val[0]["image"] is not third.val[0]["image"]


def test_loading_refuses_a_bad_site_listing_every_problem(write_site) -> None:  # type: ignore[no-untyped-def]
    image, label = blob_volume()
    site = write_site({"a": image, "b": image, "c": image}, {"a": label, "b": label, "c": label})
    (site / "imagesTr" / "a.nii.gz").unlink()
    (site / "labelsTr" / "c.nii.gz").write_bytes(b"not a nifti file at all")
    with pytest.raises(DataValidationError) as caught:
        load_site(site, task=seg3d())
    text = str(caught.value)
    assert "a.nii.gz" in text and "c.nii.gz" in text and "Fix:" in text
    assert len(caught.value.problems) == 2

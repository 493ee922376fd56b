"""validate_site / check_site: one test per kind of bad input, each naming the file and a fix."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from data_helpers import blob_volume, find_problem, save_nifti

from fedmed.config import TaskConfig
from fedmed.data import DataValidationError, check_site, validate_site
from fedmed.data.problems import DataProblem

SEG3D = TaskConfig(kind="segmentation", spatial_dims=3, image_size=[12, 12, 12])


@pytest.fixture
def good_site(write_site):  # type: ignore[no-untyped-def]
    image, label = blob_volume()
    return write_site({"a": image, "b": image, "c": image}, {"a": label, "b": label, "c": label})


def errors(path: Path, task: TaskConfig | None = SEG3D) -> list[DataProblem]:
    report = validate_site(path, task=task)
    return report.errors


def test_clean_synthetic_site_has_no_problems_and_a_useful_report(synth_seg_site: Path) -> None:
    task = TaskConfig(kind="segmentation", spatial_dims=3, image_size=[16, 16, 16])
    report = validate_site(synth_seg_site, task=task)
    assert report.problems == []
    assert report.ok and report.kind == "segmentation"
    assert report.counts == {"training": 4, "validation": 2}
    assert report.image_shapes == {(16, 16, 16): 6}
    assert report.intensity_min is not None and report.intensity_min < report.intensity_max  # type: ignore[operator]
    assert set(report.label_counts) == {0, 1} and sum(report.label_counts.values()) == 6 * 16**3
    assert "OK" in report.summary()
    assert check_site(synth_seg_site).ok


def test_validation_never_modifies_files(good_site: Path) -> None:
    (good_site / "labelsTr" / "b.nii.gz").write_bytes(b"\x1f\x8b garbage")
    before = _fingerprints(good_site)
    validate_site(good_site, task=SEG3D)
    assert _fingerprints(good_site) == before


def _fingerprints(folder: Path) -> dict[Path, tuple[int, str]]:
    files = [path for path in folder.rglob("*") if path.is_file()]
    return {path: (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()) for path in files}


def test_missing_site_folder(tmp_path: Path) -> None:
    find_problem(errors(tmp_path / "nowhere"), path=tmp_path / "nowhere", words="site folder not found")


def test_missing_dataset_json(tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    problem = find_problem(errors(tmp_path / "site"), path=tmp_path / "site" / "dataset.json", words="not found")
    assert "Decathlon" in problem.fix


def test_unparseable_dataset_json_reports_the_line(good_site: Path) -> None:
    manifest = good_site / "dataset.json"
    text = manifest.read_text().replace('"training": [', '"training" [', 1)
    manifest.write_text(text)
    line = next(number for number, content in enumerate(text.splitlines(), start=1) if '"training" [' in content)
    problem = find_problem(errors(good_site), path=manifest, words="not valid JSON")
    assert f"line {line}" in problem.message and f"line {line}" in problem.fix


def test_missing_required_key(good_site: Path) -> None:
    manifest = good_site / "dataset.json"
    raw = json.loads(manifest.read_text())
    del raw["validation"]
    manifest.write_text(json.dumps(raw))
    find_problem(errors(good_site), path=manifest, words="missing required key 'validation'")


@pytest.mark.parametrize("split", ["training", "validation"])
def test_empty_split(good_site: Path, split: str) -> None:
    manifest = good_site / "dataset.json"
    raw = json.loads(manifest.read_text())
    raw[split] = []
    manifest.write_text(json.dumps(raw))
    find_problem(errors(good_site), path=manifest, words=f"'{split}' is empty")


def test_missing_image_and_label_files_are_all_reported(good_site: Path) -> None:
    (good_site / "imagesTr" / "b.nii.gz").unlink()
    (good_site / "labelsTr" / "c.nii.gz").unlink()
    problems = errors(good_site)
    image = find_problem(problems, path=good_site / "imagesTr" / "b.nii.gz", words="image file not found")
    assert "training[0]" in image.message
    find_problem(problems, path=good_site / "labelsTr" / "c.nii.gz", words="label file not found")


def test_truncated_nifti_is_caught_by_reading_the_voxels(good_site: Path) -> None:
    path = good_site / "imagesTr" / "b.nii.gz"
    content = path.read_bytes()
    path.write_bytes(content[: len(content) * 2 // 3])
    nib.load(str(path))  # the header still parses: only reading the voxels finds the damage
    problem = find_problem(errors(good_site), path=path, words="corrupt or unreadable")
    assert "re-export" in problem.fix


def test_truncated_uncompressed_nifti(good_site: Path, tmp_path: Path) -> None:
    image, _label = blob_volume()
    path = save_nifti(tmp_path / "plain.nii", image)
    content = path.read_bytes()
    target = good_site / "imagesTr" / "a.nii"
    target.write_bytes(content[:-500])
    manifest = good_site / "dataset.json"
    manifest.write_text(manifest.read_text().replace("./imagesTr/a.nii.gz", "./imagesTr/a.nii"))
    find_problem(errors(good_site), path=target, words="corrupt")


def test_garbage_bytes_name_the_real_reason(good_site: Path) -> None:
    path = good_site / "labelsTr" / "a.nii.gz"
    path.write_bytes(np.random.default_rng(0).bytes(4000))
    problem = find_problem(errors(good_site), path=path, words="label file is corrupt")
    assert "suitable reader" not in problem.message  # MONAI's install hint would mislead a site admin


def test_image_label_shape_mismatch(good_site: Path) -> None:
    _, label = blob_volume((12, 12, 10))
    path = save_nifti(good_site / "labelsTr" / "b.nii.gz", label)
    problem = find_problem(errors(good_site), path=path, words="differs from image shape")
    assert "(12, 12, 10)" in problem.message and "b.nii.gz" in problem.message


def test_image_label_affine_mismatch_beyond_tolerance(good_site: Path) -> None:
    _, label = blob_volume()
    path = good_site / "labelsTr" / "b.nii.gz"
    tiny = np.eye(4)
    tiny[0, 3] = 1e-5
    save_nifti(path, label, tiny)
    assert not [p for p in errors(good_site) if "affine" in p.message]
    shifted = np.eye(4)
    shifted[0, 3] = 0.01
    save_nifti(path, label, shifted)
    problem = find_problem(errors(good_site), path=path, words="affine differs")
    assert "0.01 mm" in problem.message


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_non_finite_voxels(good_site: Path, bad_value: float) -> None:
    image, _ = blob_volume()
    image[1, 2, 3] = bad_value
    path = save_nifti(good_site / "imagesTr" / "c.nii.gz", image)
    problem = find_problem(errors(good_site), path=path, words="1 NaN/Inf voxel")
    assert "nan_to_num" in problem.fix


def test_undeclared_label_values(good_site: Path) -> None:
    _, label = blob_volume()
    label[0, 0, 0] = 7
    path = save_nifti(good_site / "labelsTr" / "a.nii.gz", label)
    problem = find_problem(errors(good_site, task=None), path=path, words="not declared")
    assert "[7]" in problem.message
    # With binarize_labels every value > 0 becomes 1: still worth a warning, no longer an error.
    report = validate_site(good_site, task=SEG3D.model_copy(update={"binarize_labels": True}))
    assert report.ok and any("not declared" in p.message for p in report.warnings)


def test_label_values_outside_num_classes(good_site: Path) -> None:
    manifest = good_site / "dataset.json"
    raw = json.loads(manifest.read_text())
    raw["labels"] = {"0": "bg", "1": "a", "2": "b"}
    manifest.write_text(json.dumps(raw))
    _, label = blob_volume()
    label[0, 0, 0] = 2
    path = save_nifti(good_site / "labelsTr" / "b.nii.gz", label)
    assert validate_site(good_site, task=None).ok
    problem = find_problem(errors(good_site), path=path, words="outside [0, 2)")
    assert "num_classes = 3" in problem.fix


def test_non_integer_label_map(good_site: Path) -> None:
    image, _ = blob_volume()
    path = save_nifti(good_site / "labelsTr" / "a.nii.gz", image / 3.0)
    find_problem(errors(good_site), path=path, words="non-integer")


@pytest.mark.parametrize(
    ("label", "words"), [(1.5, "neither a label file path nor an integer"), (5, "outside [0, 2)"), (True, "neither")]
)
def test_bad_classification_labels(write_site, label: object, words: str) -> None:  # type: ignore[no-untyped-def]
    image, _ = blob_volume()
    site = write_site({"a": image, "b": image, "c": image}, {"a": 0, "b": 1, "c": 0}, labels_declared={0: "n", 1: "p"})
    manifest = site / "dataset.json"
    raw = json.loads(manifest.read_text())
    raw["training"][0]["label"] = label
    manifest.write_text(json.dumps(raw))
    task = TaskConfig(kind="classification", spatial_dims=3, image_size=[8, 8, 8])
    problem = find_problem(errors(site, task=task), path=manifest, words=words)
    assert "training[0]" in problem.message


def test_task_kind_must_match_the_labels(good_site: Path) -> None:
    task = TaskConfig(kind="classification", spatial_dims=3, image_size=[8, 8, 8])
    find_problem(errors(good_site, task=task), path=good_site / "dataset.json", words="task.kind is classification")


def test_dimensionality_must_match_the_task(good_site: Path, write_site) -> None:  # type: ignore[no-untyped-def]
    task2d = TaskConfig(kind="segmentation", spatial_dims=2, image_size=[12, 12])
    problem = find_problem(errors(good_site, task=task2d), path=good_site / "imagesTr" / "a.nii.gz", words="is 3D")
    assert "spatial_dims = 3" in problem.fix
    image, label = blob_volume((12, 12, 1))  # a 2D slice stored as (H, W, 1) is 2D
    slab = write_site({"a": image, "b": image}, {"a": label, "b": label}, name="slab")
    assert validate_site(slab, task=task2d).ok


def test_npz_missing_keys_and_mismatched_lengths(tmp_path: Path) -> None:
    images = np.zeros((4, 8, 8), dtype=np.uint8)
    missing = tmp_path / "missing.npz"
    np.savez(missing, train_images=images, train_labels=np.zeros(4, dtype=np.uint8))
    problem = find_problem(errors(missing, task=None), path=missing, words="missing key(s) val_images, val_labels")
    assert "train_images" in problem.fix
    mismatched = tmp_path / "mismatched.npz"
    np.savez(mismatched, train_images=images, train_labels=np.zeros(3), val_images=images, val_labels=np.zeros(4))
    words = "train_images has 4 images but train_labels has 3"
    find_problem(errors(mismatched, task=None), path=mismatched, words=words)
    with pytest.raises(DataValidationError, match=r"mismatched.npz"):
        check_site(mismatched)


def test_npz_dimensionality_and_class_range(tmp_path: Path) -> None:
    path = tmp_path / "rgb.npz"
    rgb = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0])
    np.savez(path, train_images=rgb, train_labels=labels, val_images=rgb, val_labels=np.zeros(4, dtype=int))
    problems = errors(path, task=TaskConfig(kind="classification", spatial_dims=2, image_size=[8, 8]))
    find_problem(problems, path=path, words="train_images holds 3D images")
    find_problem(problems, path=path, words="class(es) [2] outside [0, 2)")


def test_check_site_raises_with_all_errors_in_the_message(good_site: Path) -> None:
    (good_site / "imagesTr" / "a.nii.gz").unlink()
    (good_site / "imagesTr" / "c.nii.gz").unlink()
    with pytest.raises(DataValidationError) as caught:
        check_site(good_site, task=SEG3D)
    assert len(caught.value.problems) == 2
    assert str(caught.value).count("Fix:") == 2

"""The exported bundle's per-case loop (scripts/runner.py), run here on real NIfTI files with fedmed's own
case finder, as the bundle's config wires them: case ids, layout errors, progress, units, failures."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fedmed.data.case_layout import find_cases as layout_find_cases
from fedmed.workflows.bundle_runner import classify_cases, find_cases, predict_cases

SHAPE = (6, 5, 4)


def _write(path: Path, value: float, *, shape: tuple[int, ...] = SHAPE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(np.full(shape, value, dtype=np.float32), np.diag([0.9, 0.9, 2.5, 1.0]))
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, str(path))
    return path


def _brats(root: Path, subjects: dict[str, float]) -> Path:
    """BraTS style: every subject's folder holds its modalities under the same file names."""
    for subject, value in subjects.items():
        _write(root / subject / "FLAIR.nii.gz", value)
        _write(root / subject / "T1.nii.gz", value + 1)
    return root


def _mean_of_channels(case: dict) -> np.ndarray:
    """A stand-in network: each voxel's mean over the case's channels, read from its files."""
    stacked = np.stack([np.asarray(nib.load(file).dataobj) for file in case["files"]])
    return stacked.mean(axis=0, keepdims=True)


def _datalist(inputs: str | list[str], *, channels: int = 2, names: list[str] | None = None) -> list[dict]:
    return find_cases(inputs, finder=layout_find_cases, channels=channels, channel_names=names or ["FLAIR", "T1"])


def test_subjects_with_identical_file_names_get_one_output_each_named_by_subject(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = _brats(tmp_path / "in", {"BraTS-001": 10.0, "BraTS-002": 20.0})
    cases = _datalist(str(images))
    assert [case["case_id"] for case in cases] == ["BraTS-001", "BraTS-002"]
    assert [Path(file).name for file in cases[0]["image"]] == ["FLAIR.nii.gz", "T1.nii.gz"]
    # Pointed at one subject's folder: that one case, its files as its channels (not one case per file).
    (alone,) = _datalist(str(images / "BraTS-002"))
    assert alone["case_id"] == "BraTS-002" and alone["files"] == cases[1]["files"]
    out = tmp_path / "out"
    written = predict_cases(
        cases, predict=_mean_of_channels, output_dir=str(out), postfix="seg", label=True, channels=2
    )
    assert sorted(Path(path).name for path in written) == ["BraTS-001_seg.nii.gz", "BraTS-002_seg.nii.gz"]
    for subject, value in (("BraTS-001", 10.5), ("BraTS-002", 20.5)):
        saved = nib.load(str(out / f"{subject}_seg.nii.gz"))
        assert np.asarray(saved.dataobj).dtype == np.uint8 and int(np.asarray(saved.dataobj)[0, 0, 0]) == int(value)
        # The source's header: its affine and its units (MONAI's SaveImage writes "unknown").
        np.testing.assert_allclose(saved.affine, np.diag([0.9, 0.9, 2.5, 1.0]))
        assert saved.header.get_xyzt_units() == ("mm", "sec")
    lines = capsys.readouterr().out.splitlines()
    assert f"case 1/2 BraTS-001 → {out / 'BraTS-001_seg.nii.gz'}" in lines
    assert f"case 2/2 BraTS-002 → {out / 'BraTS-002_seg.nii.gz'}" in lines
    rows = list(csv.DictReader((out / "cases.csv").open()))
    assert [row["case"] for row in rows] == ["BraTS-001", "BraTS-002"] and {row["status"] for row in rows} == {"ok"}
    assert rows[1]["inputs"] == f"{images / 'BraTS-002' / 'FLAIR.nii.gz'};{images / 'BraTS-002' / 'T1.nii.gz'}"
    assert rows[1]["output"] == str(out / "BraTS-002_seg.nii.gz")


def test_a_folder_holding_another_patients_outputs_under_the_same_name_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = _datalist(str(_brats(tmp_path / "ward-1", {"sub-1": 1.0})))
    predict_cases(first, predict=_mean_of_channels, output_dir=str(out), postfix="seg", label=True, channels=2)
    before = (out / "sub-1_seg.nii.gz").read_bytes()
    predict_cases(first, predict=_mean_of_channels, output_dir=str(out), postfix="seg", label=True, channels=2)
    other = _datalist(str(_brats(tmp_path / "ward-2", {"sub-1": 7.0, "sub-2": 8.0})))
    with pytest.raises(SystemExit, match=r"already holds outputs of a case named .sub-1.*nothing was written"):
        predict_cases(other, predict=_mean_of_channels, output_dir=str(out), postfix="seg", label=True, channels=2)
    assert (out / "sub-1_seg.nii.gz").read_bytes() == before and not (out / "sub-2_seg.nii.gz").exists()


def test_an_empty_folder_exits_with_the_layouts_message(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as stopped:
        _datalist(str(tmp_path / "empty"))
    assert str(stopped.value.code).startswith(f"fedmed bundle: {tmp_path / 'empty'}: no NIfTI files")
    assert "point at the folder that holds the scans" in str(stopped.value.code)


def test_a_folder_that_does_not_give_the_models_channels_exits_with_the_fix(tmp_path: Path) -> None:
    _write(tmp_path / "one-case" / "scan_a.nii.gz", 1.0)
    _write(tmp_path / "one-case" / "scan_b.nii.gz", 2.0)
    with pytest.raises(SystemExit) as stopped:
        _datalist(str(tmp_path / "one-case"))
    message = str(stopped.value.code)
    assert "no file for channel 'FLAIR'" in message and "e.g. FLAIR.nii.gz" in message


def test_two_inputs_that_would_write_one_output_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    scan = _write(tmp_path / "a" / "case.nii.gz", 1.0)
    with pytest.raises(SystemExit, match="would both write outputs named 'case'; nothing was written"):
        find_cases([str(scan), str(scan)], finder=layout_find_cases, channels=1)


def test_a_bad_case_is_reported_the_others_complete_and_the_run_exits_non_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write(tmp_path / "in" / "good.nii.gz", 3.0)
    _write(tmp_path / "in" / "fourd.nii.gz", 3.0, shape=(*SHAPE, 2))  # two channels for a one-channel model
    cases = _datalist(str(tmp_path / "in"), channels=1, names=["CT"])
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"1 of 2 case\(s\) predicted; failed: fourd"):
        predict_cases(cases, predict=_mean_of_channels, output_dir=str(out), postfix="seg", label=True, channels=1)
    assert sorted(p.name for p in out.iterdir()) == ["cases.csv", "good_seg.nii.gz"]
    rows = {row["case"]: row for row in csv.DictReader((out / "cases.csv").open())}
    assert rows["fourd"]["status"] == "failed" and "hold 2 channel(s) but the model takes 1" in rows["fourd"]["error"]
    assert "case 1/2 fourd failed: its file(s) hold 2 channel(s)" in capsys.readouterr().err


def test_classification_rows_are_named_by_case(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _brats(tmp_path / "in", {"sub-1": 1.0, "sub-2": 2.0})
    cases = _datalist(str(tmp_path / "in"))
    classify_cases(
        cases,
        predict=lambda case: np.array([0.25, 0.75]) if case["case_id"] == "sub-1" else np.array([0.9, 0.1]),
        output_dir=str(tmp_path / "out"),
        class_names=["normal", "pneumonia"],
        channels=2,
    )
    rows = list(csv.DictReader((tmp_path / "out" / "predictions.csv").open()))
    assert [(row["case"], row["predicted"], row["p_pneumonia"]) for row in rows] == [
        ("sub-1", "pneumonia", "0.750000"),
        ("sub-2", "normal", "0.100000"),
    ]
    assert "case 1/2 sub-1 → pneumonia (p = 0.750)" in capsys.readouterr().out


@torch.no_grad()  # as the bundle's run
def test_the_bundles_test_time_augmentation_is_predicts() -> None:
    """The bundle's passes and uncertainty (scripts/runner.py, no fedmed) equal fedmed.tasks.uncertainty's."""
    from fedmed.tasks.uncertainty import normalized_entropy, segmentation_score, tta_augmentations
    from fedmed.workflows.bundle_runner import averaged_probabilities, labels_and_uncertainty

    torch.manual_seed(0)
    network = torch.nn.Conv3d(2, 3, kernel_size=3, padding=1)
    image = torch.randn(2, 8, 7, 6)
    infer = lambda batch, net: net(batch)  # noqa: E731 - what MONAI's inferers call
    for flips in (True, False):
        augmentations = tta_augmentations(3, trained_with_flips=flips)
        described = [{"flip": list(a.flip), "shift": list(a.shift), "gain": a.gain} for a in augmentations]
        ours = averaged_probabilities(image, inferer=infer, network=network, augmentations=described)
        passes = [network(image[None])[0]] + [a.undo(network(a.apply(image)[None])[0]) for a in augmentations]
        expected = torch.stack([logits.softmax(dim=0) for logits in passes]).mean(dim=0)
        torch.testing.assert_close(ours, expected)
        outputs = labels_and_uncertainty(ours, uncertainty=True)
        torch.testing.assert_close(outputs["uncertainty"], normalized_entropy(ours))
        assert outputs["score"] == pytest.approx(segmentation_score(ours, normalized_entropy(ours)))
        assert torch.equal(outputs["pred"], ours.argmax(dim=0, keepdim=True).to(torch.uint8))
    plain = averaged_probabilities(image, inferer=infer, network=network)
    torch.testing.assert_close(plain, network(image[None])[0].softmax(dim=0))

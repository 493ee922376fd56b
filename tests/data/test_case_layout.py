"""Finding and naming prediction cases: subject folders, nnU-Net numbering, manifests, collisions."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedmed.data.case_layout import CaseLayoutError, case_ids, find_cases


def _nifti(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(path))
    return path


def _brats_subjects(root: Path, *subjects: str) -> None:
    for subject in subjects:  # every subject's files named alike, a label beside them, as BraTS releases come
        for name in ("FLAIR", "T1", "GT_W"):
            _nifti(root / subject / f"{name}.nii.gz")


def test_subjects_with_identical_file_names_are_named_by_their_folders(tmp_path: Path) -> None:
    _brats_subjects(tmp_path, "subject-07", "subject-11")
    cases = find_cases([tmp_path], channels=2, channel_names=["FLAIR", "T1"])
    assert [case.case_id for case in cases] == ["subject-07", "subject-11"]
    assert [[file.name for file in case.images] for case in cases] == [["FLAIR.nii.gz", "T1.nii.gz"]] * 2
    assert cases[1].images[0].parent.name == "subject-11"


def test_one_subject_folder_is_one_multimodal_case(tmp_path: Path) -> None:
    _brats_subjects(tmp_path, "subject-07")
    (case,) = find_cases([tmp_path / "subject-07"], channels=2, channel_names=["flair", "t1"])
    assert case.case_id == "subject-07" and [f.name for f in case.images] == ["FLAIR.nii.gz", "T1.nii.gz"]


def test_channel_names_match_whole_words_only(tmp_path: Path) -> None:
    for name in ("p1_T1POST.nii.gz", "p1_T1.nii.gz", "p1_FLAIR.nii.gz"):
        _nifti(tmp_path / "p1" / name)
    (case,) = find_cases([tmp_path], channels=2, channel_names=["T1", "FLAIR"])
    assert [f.name for f in case.images] == ["p1_T1.nii.gz", "p1_FLAIR.nii.gz"]


def test_a_folder_the_channels_cannot_be_matched_in_is_refused_with_the_fix(tmp_path: Path) -> None:
    _brats_subjects(tmp_path, "subject-07")
    with pytest.raises(CaseLayoutError, match=r"subject-07: cannot tell which .* <case>_0000"):
        find_cases([tmp_path / "subject-07"], channels=2)
    with pytest.raises(CaseLayoutError, match=r"no file for channel 'T2'"):
        find_cases([tmp_path / "subject-07"], channels=2, channel_names=["FLAIR", "T2"])


def test_nnunet_numbering_groups_channels_and_names_the_case(tmp_path: Path) -> None:
    for case in ("BRATS_001", "BRATS_002"):
        for channel in (1, 0):
            _nifti(tmp_path / f"{case}_{channel:04d}.nii.gz")
    cases = find_cases([tmp_path], channels=2)
    assert [case.case_id for case in cases] == ["BRATS_001", "BRATS_002"]
    assert [f.name for f in cases[0].images] == ["BRATS_001_0000.nii.gz", "BRATS_001_0001.nii.gz"]
    (tmp_path / "BRATS_002_0001.nii.gz").unlink()
    with pytest.raises(CaseLayoutError, match=r"case 'BRATS_002' has channel file\(s\) \[0\]"):
        find_cases([tmp_path], channels=2)


def test_manifest_entries_are_named_by_their_stems(tmp_path: Path) -> None:
    for name in ("hippocampus_001", "hippocampus_004"):
        _nifti(tmp_path / "imagesTs" / f"{name}.nii.gz")
    manifest = {
        "test": ["./imagesTs/hippocampus_004.nii.gz"],
        "training": [{"image": "./imagesTs/hippocampus_001.nii.gz"}],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(manifest))
    assert [case.case_id for case in find_cases([tmp_path], channels=1)] == ["hippocampus_004", "hippocampus_001"]


def test_the_same_case_twice_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    scan = _nifti(tmp_path / "scan.nii.gz")
    with pytest.raises(CaseLayoutError, match=r"would both write outputs named 'scan'; nothing was written"):
        find_cases([scan, scan], channels=1)


def test_an_empty_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CaseLayoutError, match=r"no NIfTI files .* no subject folders"):
        find_cases([tmp_path], channels=1)


def test_ids_fall_back_from_stem_to_folder_to_path() -> None:
    assert case_ids([[Path("a/x.nii.gz")], [Path("b/y.nii.gz")]]) == ["x", "y"]
    assert case_ids([[Path("a/x.nii.gz")], [Path("b/x.nii.gz")]]) == ["a", "b"]
    assert case_ids([[Path("/s1/a/x.nii.gz")], [Path("/s2/a/x.nii.gz")], [Path("/s2/a/y.nii.gz")]]) == [
        "s1-a-x",
        "s2-a-x",
        "s2-a-y",
    ]

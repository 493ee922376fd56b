"""A file is named for what it is: another format renamed .nii/.nii.gz is called by its real kind."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from fedmed.data.io import WrongFileTypeError, nifti_affine, read_image, write_nifti
from fedmed.data.sniff import sniff_kind


@pytest.mark.parametrize(
    ("content", "kind"),
    [
        (b"\x89PNG\r\n\x1a\n" + bytes(40), "PNG"),
        (b"\xff\xd8\xff\xe0" + bytes(40), "JPEG"),
        (bytes(128) + b"DICM" + bytes(40), "DICOM"),
        (b"", None),
        (b"hello, world", None),
    ],
    ids=["png", "jpeg", "dicom", "empty", "unknown"],
)
@pytest.mark.parametrize("name", ["scan.nii.gz", "scan.nii"])
def test_other_formats_are_named(tmp_path: Path, content: bytes, kind: str | None, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    assert sniff_kind(path) == kind  # None: damaged or unknown, which the reader reports as corrupt


def test_a_gzipped_png_is_still_not_nifti(tmp_path: Path) -> None:
    path = tmp_path / "scan.nii.gz"
    path.write_bytes(gzip.compress(b"\x89PNG\r\n\x1a\n" + bytes(600)))
    assert sniff_kind(path) == "PNG"


@pytest.mark.parametrize("name", ["scan.nii.gz", "scan.nii"])
def test_real_nifti_passes_and_reads(tmp_path: Path, name: str) -> None:
    array = np.zeros((8, 8, 8), dtype=np.float32)
    path = tmp_path / name
    write_nifti(path, array, affine=nifti_affine(shape=array.shape))
    assert sniff_kind(path) == "NIfTI"
    assert read_image(path).shape[1:] == (8, 8, 8)


def test_reading_a_renamed_png_says_so(tmp_path: Path) -> None:
    path = tmp_path / "label.nii.gz"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    with pytest.raises(WrongFileTypeError, match=r"not a NIfTI file \(looks like PNG\)"):
        read_image(path)

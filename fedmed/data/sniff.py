"""What a file really is, from its first bytes: a PNG renamed `.nii.gz` must be called a PNG, not
reported later as an affine mismatch."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

NIFTI = "NIfTI"
# Leading bytes of formats people mistake for NIfTI (or save under a NIfTI name by accident).
SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"GIF8", "GIF"),
    (b"%PDF", "PDF"),
    (b"PK\x03\x04", "ZIP"),
    (b"\x93NUMPY", "NumPy .npy"),
    (b"\x89HDF", "HDF5"),
)
NIFTI_HEADER_SIZES = (348, 540)  # NIfTI-1 and NIfTI-2 `sizeof_hdr`, in either byte order
HEAD_BYTES = 544


def sniff_kind(path: Path) -> str | None:
    """ "NIfTI", the name of another recognized format, or None when the content is damaged or unknown
    (the image reader then reports it as corrupt, which is what it most likely is)."""
    path = Path(path)
    with path.open("rb") as handle:
        head = handle.read(HEAD_BYTES)
    if head[:2] == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as handle:
                head = handle.read(HEAD_BYTES)
        except (OSError, EOFError, zlib.error):
            return None
    if len(head) >= 4 and any(int.from_bytes(head[:4], order) in NIFTI_HEADER_SIZES for order in ("little", "big")):
        return NIFTI
    for signature, name in SIGNATURES:
        if head.startswith(signature):
            return name
    if head[128:132] == b"DICM":
        return "DICOM"
    return None

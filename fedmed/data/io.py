"""Reading images through MONAI and writing NIfTI.

MONAI's LoadImage (nibabel reader) applies NIfTI scale factors (scl_slope / scl_inter) and keeps the
affine, which later feeds the RAS reorientation. MONAI is imported lazily: it takes seconds to import and
`import fedmed.data` must stay cheap for the CLI.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .sniff import NIFTI, sniff_kind

if TYPE_CHECKING:
    from monai.data import MetaTensor

ImageFormat = Literal["nifti", "png"]


class ImageReadError(Exception):
    """An image file could not be read; str() is the underlying reason, without a traceback."""


class WrongFileTypeError(ImageReadError):
    """The file's content is another format than its name says (e.g. a PNG named .nii.gz)."""


class EmptyImageError(ImageReadError):
    """The file reads but holds no voxels (an axis of length 0); str() gives its stored shape."""


def image_format(path: Path) -> ImageFormat | None:
    name = Path(path).name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith(".png"):
        return "png"
    return None


@functools.cache
def _loader(kind: ImageFormat) -> Any:
    from monai.data import NibabelReader, PILReader
    from monai.transforms import LoadImage

    # reverse_indexing=False keeps PNG arrays (H, W) like NumPy and MedMNIST, instead of ITK's (W, H).
    reader = NibabelReader() if kind == "nifti" else PILReader(reverse_indexing=False)
    return LoadImage(reader=reader, image_only=True, ensure_channel_first=True, dtype=None)


def read_image(path: Path) -> MetaTensor:
    """Read every voxel of a NIfTI or PNG file: channel-first MetaTensor with the file's affine.

    Reading all voxels (not just the header) is what catches truncated files.
    """
    path = Path(path)
    kind = image_format(path)
    if kind is None:
        raise ImageReadError(f"unsupported file type '{path.name}' (fedmed reads .nii, .nii.gz and .png)")
    if kind == "nifti":
        # Sniffed first: another reader would otherwise open a renamed file and fail later, misleadingly.
        try:
            kind_found = sniff_kind(path)
        except OSError as error:
            raise ImageReadError(_first_line(error)) from error
        if kind_found not in (None, NIFTI):
            raise WrongFileTypeError(f"not a NIfTI file (looks like {kind_found})")
    try:
        with warnings.catch_warnings():
            # PIL hands MONAI read-only buffers; torch warns about it on every PNG.
            warnings.filterwarnings("ignore", message=".*non-writable.*")
            image = _loader(kind)(str(path))
    except Exception as error:  # any reader failure is reported as a data problem
        raise ImageReadError(_reason(path, error, kind)) from error
    if image.numel() == 0:  # every later step indexes voxels: refuse here, naming the file
        raise EmptyImageError(f"shape {_stored_shape(path, image, kind)}")
    return image


def _stored_shape(path: Path, image: Any, kind: ImageFormat) -> tuple[int, ...]:
    if kind == "nifti":  # MONAI flattens an empty array to shape (0,); the header keeps the real one
        import nibabel

        return tuple(int(size) for size in nibabel.load(str(path)).shape)
    return tuple(int(size) for size in image.shape[1:])


def _reason(path: Path, error: Exception, kind: ImageFormat) -> str:
    reason = _first_line(error)
    if "cannot find a suitable reader" in reason and kind == "nifti":
        # MONAI hides the reader's own complaint behind an install hint; nibabel gives the real reason.
        import nibabel

        try:
            nibabel.load(str(path))
        except Exception as inner:  # whatever nibabel raises is the reason to show
            return _first_line(inner)
    return reason


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def spatial_array(image: MetaTensor) -> np.ndarray:
    """The first channel as a NumPy array (no channel axis)."""
    return np.asarray(image.detach().cpu().numpy()[0])


def stack_modalities(images: Sequence[MetaTensor]) -> MetaTensor:
    """A case's modalities as the channels of one image, in order, with the first one's affine and metadata.

    The caller has checked that they share one grid; trailing singleton axes (a 2D slice stored as
    (H, W, 1)) may still differ, so each is laid out like the first before concatenating.
    """
    import torch

    first = images[0]
    if len(images) == 1:
        return first
    others = [image.reshape(image.shape[0], *first.shape[1:]) for image in images[1:]]
    # torch.cat keeps the first MetaTensor's metadata (affine included), which the RAS reorientation reads.
    return torch.cat([first, *others], dim=0)


def affine_of(image: MetaTensor) -> np.ndarray:
    return np.asarray(image.affine.detach().cpu().numpy(), dtype=np.float64)


def nifti_affine(*, spacing: float = 1.0, shape: tuple[int, ...]) -> np.ndarray:
    """RAS affine with isotropic spacing and the volume centred on the origin."""
    affine = np.eye(4)
    for axis, size in enumerate(shape[:3]):
        affine[axis, axis] = spacing
        affine[axis, 3] = -spacing * (size - 1) / 2.0
    return affine


def write_nifti(path: Path, array: np.ndarray, *, affine: np.ndarray) -> None:
    """Write an array as NIfTI with the given affine; dtype is kept (float32 images, uint8 labels)."""
    import nibabel

    image = nibabel.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    image.header.set_data_dtype(array.dtype)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    # nibabel writes gzip with mtime 0, so identical arrays give identical files.
    nibabel.save(image, str(path))

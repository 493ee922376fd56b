"""Image slices for reports a person opens offline: read a scan for display, pick planes, draw a label map's
contours and a heat map over the greyscale, and encode the result as a PNG data URI (Pillow).

3D volumes are shown in RAS (nibabel's closest canonical orientation): axial and coronal planes with the
patient's right on the image's right and anterior or superior at the top, sagittal with anterior on the
right. Pixels are resampled to the voxel spacing, so a slice looks as long as it is in millimetres.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

MAX_SIDE = 256  # pixels: the longest side of a slice in the report, so 50+ cases stay a readable page
MIN_SIDE = 192  # small crops (a hippocampus is 35 voxels across) are enlarged to this to be legible
PLANES = ("axial", "coronal", "sagittal")
# Distinct on greyscale and for the common colour-vision deficiencies (Trubetzkoy's list), class 1 first.
LABEL_COLOURS = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
)
HEAT_OPACITY = 0.85
HEAT_FLOOR = 0.05  # below this fraction of the scale the heat map is transparent: the anatomy shows through


@dataclass
class DisplayImage:
    """The first channel of a scan, laid out for display (3D: RAS), with its pixel spacing in mm."""

    array: np.ndarray
    spacing: tuple[float, ...]

    @property
    def is_volume(self) -> bool:
        return self.array.ndim == 3


@dataclass
class Plane:
    """One 2D view of a volume: which plane, which index along its normal axis, and the pixel spacing."""

    name: str
    index: int
    spacing: tuple[float, float]  # rows, columns


def read_display(path: Path) -> DisplayImage:
    """A NIfTI (2D, 3D, or 4D with channels last) or PNG file's first channel, ready for slicing."""
    if Path(path).name.lower().endswith(".png"):
        pixels = np.asarray(Image.open(path))
        return DisplayImage((pixels[..., 0] if pixels.ndim == 3 else pixels).astype(np.float32), (1.0, 1.0))
    import nibabel

    image: Any = nibabel.load(str(path))
    shape = list(image.shape)
    spatial = 3 if len(shape) >= 3 and not all(size == 1 for size in shape[2:3]) else 2
    if spatial == 3:
        image = nibabel.as_closest_canonical(image)
    data = np.asanyarray(image.dataobj)
    data = data.reshape(*data.shape[:spatial], -1)[..., 0]  # the first channel (4D) or the singleton axis (2D)
    zooms = tuple(float(zoom) or 1.0 for zoom in image.header.get_zooms()[:spatial])
    return DisplayImage(np.asarray(data, dtype=np.float32), zooms)


def resample_to(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Linear resampling of a map on another grid (a model's input grid) to `shape`, the axes aligned."""
    from scipy import ndimage

    factors = [target / size for target, size in zip(shape, array.shape, strict=True)]
    zoomed = ndimage.zoom(np.asarray(array, dtype=np.float32), factors, order=1, grid_mode=True, mode="nearest")
    # zoom rounds each axis; crop or pad (edge) to the exact shape
    zoomed = zoomed[tuple(slice(0, size) for size in shape)]
    padding = [(0, target - size) for target, size in zip(shape, zoomed.shape, strict=True)]
    return np.pad(zoomed, padding, mode="edge") if any(after for _, after in padding) else zoomed


def centre_planes(image: DisplayImage, *, focus: np.ndarray | None) -> list[Plane]:
    """Axial, coronal and sagittal planes through the middle of `focus` (the voxels > 0: the predicted
    foreground), or through the volume's centre when there is none; a 2D image is its one plane."""
    if not image.is_volume:
        return [Plane("image", 0, (image.spacing[0], image.spacing[1]))]
    shape = image.array.shape
    centre = [size // 2 for size in shape]
    if focus is not None and focus.shape == shape and bool((focus > 0).any()):
        # the median voxel lies inside a compact structure; the centroid of a ring would not
        centre = [int(np.median(axis)) for axis in np.nonzero(focus > 0)]
    x, y, z = image.spacing
    return [
        Plane("axial", centre[2], (y, x)),
        Plane("coronal", centre[1], (z, x)),
        Plane("sagittal", centre[0], (z, y)),
    ]


def cut(volume: np.ndarray, plane: Plane) -> np.ndarray:
    """The plane's slice of a RAS volume, rows top to bottom (anterior or superior first); a 2D image as stored."""
    if plane.name == "image":
        return volume
    if plane.name == "axial":
        section = volume[:, :, plane.index]
    elif plane.name == "coronal":
        section = volume[:, plane.index, :]
    else:
        section = volume[plane.index, :, :]
    return section.T[::-1]


def display_size(shape: Sequence[int], spacing: Sequence[float]) -> tuple[int, int]:
    """(height, width) in pixels: millimetre proportions, the longest side within [MIN_SIDE, MAX_SIDE]."""
    height_mm, width_mm = shape[0] * spacing[0], shape[1] * spacing[1]
    longest = min(MAX_SIDE, max(MIN_SIDE, max(shape)))
    scale = longest / max(height_mm, width_mm)
    return max(1, round(height_mm * scale)), max(1, round(width_mm * scale))


def resize(section: np.ndarray, size: tuple[int, int], *, labels: bool = False) -> np.ndarray:
    """Resize a 2D slice; labels by nearest neighbour (a class is never blended into another)."""
    if section.shape == size:
        return section
    if labels:
        picture = Image.fromarray(np.ascontiguousarray(section, dtype=np.int32))
        return np.asarray(picture.resize((size[1], size[0]), Image.Resampling.NEAREST))
    picture = Image.fromarray(np.ascontiguousarray(section, dtype=np.float32))
    return np.asarray(picture.resize((size[1], size[0]), Image.Resampling.BILINEAR))


def window(array: np.ndarray) -> tuple[float, float]:
    """Grey levels for a whole scan: its 0.5th to 99.5th percentile, so one bright voxel does not wash it out."""
    finite = array[np.isfinite(array)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = (float(value) for value in np.percentile(finite, [0.5, 99.5]))
    return (low, high) if high > low else (low, low + 1.0)


def grey(section: np.ndarray, levels: tuple[float, float]) -> np.ndarray:
    low, high = levels
    values = np.clip((np.nan_to_num(section, nan=low) - low) / (high - low), 0.0, 1.0)
    return np.repeat((values * 255).astype(np.uint8)[..., None], 3, axis=2)


def draw_contours(rgb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each class's outline (two pixels wide, its LABEL_COLOURS entry) drawn over an RGB slice."""
    out = rgb.copy()
    for label in (int(value) for value in np.unique(labels) if value > 0):
        mask = labels == label
        edge = _dilate(mask) & ~_erode(mask)
        out[edge] = label_colour(label)
    return out


def label_colour(label: int) -> tuple[int, int, int]:
    return LABEL_COLOURS[(label - 1) % len(LABEL_COLOURS)]


def blend_heat(rgb: np.ndarray, values: np.ndarray, *, scale: float, colour_map: str) -> np.ndarray:
    """A heat map over an RGB slice: values in [0, scale] coloured, and opaque in proportion to their size."""
    from matplotlib import colormaps

    fraction = np.clip(np.nan_to_num(values) / scale, 0.0, 1.0) if scale > 0 else np.zeros(values.shape)
    colours = colormaps[colour_map](fraction)[..., :3] * 255
    opacity = np.where(fraction < HEAT_FLOOR, 0.0, HEAT_OPACITY * fraction)[..., None]
    return (rgb * (1.0 - opacity) + colours * opacity).round().astype(np.uint8)


def colour_bar(colour_map: str, *, width: int = 160, height: int = 12) -> np.ndarray:
    from matplotlib import colormaps

    ramp = colormaps[colour_map](np.linspace(0.0, 1.0, width))[:, :3] * 255
    return np.repeat(ramp.round().astype(np.uint8)[None], height, axis=0)


def section(volume: np.ndarray, plane: Plane, *, labels: bool = False) -> np.ndarray:
    """A plane of a volume (or a 2D image as it is) at display size."""
    cut_section = cut(volume, plane)
    return resize(cut_section, display_size(cut_section.shape, plane.spacing), labels=labels)


View = Callable[[Plane], np.ndarray]  # one plane drawn as an RGB picture


def grey_view(volume: np.ndarray, *, levels: tuple[float, float]) -> View:
    return lambda plane: grey(section(volume, plane), levels)


def contour_view(volume: np.ndarray, labels: np.ndarray | None, *, levels: tuple[float, float]) -> View:
    """The image, with the label map's outlines when there is one."""

    def draw(plane: Plane) -> np.ndarray:
        rgb = grey(section(volume, plane), levels)
        if labels is None:
            return rgb
        return draw_contours(rgb, section(labels.astype(np.int32), plane, labels=True))

    return draw


def heat_view(
    volume: np.ndarray, values: np.ndarray, *, levels: tuple[float, float], scale: float, colour_map: str
) -> View:
    """The image with `values` (same grid) as a heat overlay on the colour scale [0, scale]."""
    return lambda plane: blend_heat(
        grey(section(volume, plane), levels), section(values, plane), scale=scale, colour_map=colour_map
    )


def png_data_uri(rgb: np.ndarray) -> str:
    """An RGB uint8 array as a `data:image/png;base64,...` URI an <img> shows without any other file."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _dilate(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    return padded[1:-1, 1:-1] | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]


def _erode(mask: np.ndarray) -> np.ndarray:
    return ~_dilate(~mask)

"""Whole-volume inference and evaluation in the original image space (scan geometry).

Each validation volume is predicted by sliding windows on the resampled grid (MONAI's
SlidingWindowInferer, Gaussian blending by default), the output is inverted onto the source image's grid
(MONAI's Invertd undoes reorientation, resampling and cropping) and only then compared with the label
as stored: Dice per class and per region, HD95 and mean surface distance in millimetres. Enhancement
compares the restored volume with the source image on its own grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fedmed.config import InferenceConfig, TaskConfig
from fedmed.data.scan_site import Record, VolumeCases

from .surface import region_hd95_and_msd

CaseRows = list[dict[str, Any]]


def sliding_window_inferer(*, roi_size: list[int], inference: InferenceConfig, device: torch.device) -> Any:
    # MONAI is heavy: imported when first used
    from monai.inferers import SlidingWindowInferer

    return SlidingWindowInferer(
        roi_size=roi_size,
        sw_batch_size=inference.sw_batch_size,
        overlap=inference.overlap,
        mode=inference.blend,
        sw_device=device,
        device=torch.device("cpu"),  # the stitched volume stays in host memory; only windows visit the GPU
    )


@torch.no_grad()
def predict_volume(model: nn.Module, image: torch.Tensor, *, inferer: Any, device: torch.device) -> torch.Tensor:
    """The network's output for one channel-first volume on its (resampled) grid, batch axis removed."""
    plain = image.as_tensor() if hasattr(image, "as_tensor") else image
    return inferer(plain[None].float(), model)[0].float().cpu()


def to_original_grid(output: torch.Tensor, *, image: Any, preprocessing: Any) -> Any:
    """Undo the preprocessing's geometry on `output` (channel-first, on `image`'s grid): the result has the
    source file's shape and affine. Interpolated, so class probabilities invert before the argmax."""
    # MONAI is heavy: imported when first used
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    prediction = MetaTensor(output, meta=dict(image.meta))
    invert = Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=False, to_tensor=True)
    return invert({"pred": prediction, "image": image})["pred"]


def read_label(path: str, *, binarize: bool) -> Any:
    """The label map as stored (channel-first, source grid), as integer classes."""
    # MONAI is heavy: imported when first used
    from monai.transforms import LoadImage

    label = LoadImage(image_only=True, ensure_channel_first=True, reader="NibabelReader")(path)
    return ((label > 0) if binarize else torch.round(label)).to(torch.int64)


def segmentation_case_metrics(
    labelmap: torch.Tensor, truth: torch.Tensor, *, task: TaskConfig, spacing: list[float]
) -> dict[str, float]:
    """Dice, HD95 and mean surface distance (mm) of one case, each as the mean over the foreground classes, per
    class and per region; nan where undefined (a class absent from both prediction and label has no Dice, one
    absent from either has no surface distance)."""
    # MONAI is heavy: imported when first used
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    classes = task.num_classes
    prediction = one_hot(labelmap[None], num_classes=classes)
    reference = one_hot(truth[None], num_classes=classes)
    per_class = DiceMetric(include_background=False, reduction="none", ignore_empty=True)(prediction, reference)[0]
    row: dict[str, float] = {"dice": _nanmean(per_class)}
    if classes > 2:
        row |= {f"dice_{task.class_name(value)}": float(per_class[value - 1]) for value in range(1, classes)}
    if task.regions:
        predicted_regions = _regions(labelmap, task.regions)
        true_regions = _regions(truth, task.regions)
        region_dice = DiceMetric(include_background=True, reduction="none", ignore_empty=True)(
            predicted_regions, true_regions
        )[0]
        row |= {f"dice_{name}": float(value) for name, value in zip(task.regions, region_dice, strict=True)}
    return row | _surface_metrics(labelmap, truth, task=task, spacing=spacing)


def _surface_metrics(
    labelmap: torch.Tensor, truth: torch.Tensor, *, task: TaskConfig, spacing: list[float]
) -> dict[str, float]:
    """HD95 and MSD (mm): `hd95`/`msd` the mean over the foreground classes, then per class and per region
    under the names Dice uses (`hd95_<class>`, `msd_<region>`)."""
    classes = task.num_classes
    # Named as the Dice keys are: per class only beyond one foreground class, per region always.
    names = [task.class_name(value) for value in range(1, classes)] if classes > 2 else []
    regions = [[value] for value in range(1, classes)] + list(task.regions.values())
    # Not MONAI's HausdorffDistanceMetric: its CPU KD-tree takes minutes on an early round's speckled whole volume.
    hd95, msd = region_hd95_and_msd(labelmap[0].numpy(), truth[0].numpy(), regions=regions, spacing=spacing)
    per_class = classes - 1
    row = {
        "hd95": _finite_mean(torch.tensor(hd95[:per_class], dtype=torch.float64)),
        "msd": _finite_mean(torch.tensor(msd[:per_class], dtype=torch.float64)),
    }
    named = [*zip(names, range(per_class)), *zip(task.regions, range(per_class, len(regions)))]
    row |= {f"hd95_{name}": hd95[index] for name, index in named}
    row |= {f"msd_{name}": msd[index] for name, index in named}
    return row


def _spacing(affine: Any) -> list[float]:
    # MONAI is heavy: imported when first used
    from monai.data.utils import affine_to_spacing

    return [float(value) for value in affine_to_spacing(affine, r=3)]


def _regions(labelmap: torch.Tensor, regions: dict[str, list[int]]) -> torch.Tensor:
    masks = [torch.isin(labelmap[0], torch.tensor(values)) for values in regions.values()]
    return torch.stack(masks)[None].float()


def predict_labelmap(model: nn.Module, cases: VolumeCases, index: int, *, inferer: Any, device: torch.device) -> Any:
    """Case `index`'s predicted label map on its source image's grid (shape and affine of the file)."""
    item = cases[index]
    logits = predict_volume(model, item["image"], inferer=inferer, device=device)
    probabilities = to_original_grid(logits.softmax(dim=0), image=item["image"], preprocessing=cases.preprocessing)
    return probabilities.argmax(dim=0, keepdim=True).to(torch.uint8)


def evaluate_segmentation_volumes(
    model: nn.Module,
    cases: VolumeCases,
    *,
    task: TaskConfig,
    device: torch.device,
    on_case: Callable[[Record], None] | None = None,
) -> tuple[dict[str, float], CaseRows]:
    """Site metrics (mean over cases) and one row per case, all in the original image space."""
    model.eval()
    inferer = sliding_window_inferer(roi_size=cases.roi_size, inference=cases.inference, device=device)
    rows: CaseRows = []
    for index, record in enumerate(cases.records):
        labelmap = predict_labelmap(model, cases, index, inferer=inferer, device=device).as_tensor().to(torch.int64)
        truth = read_label(record["label"], binarize=task.binarize_labels)
        if tuple(truth.shape) != tuple(labelmap.shape):
            raise RuntimeError(
                f"{record['case']}: the prediction inverted onto the original grid has shape "
                f"{tuple(labelmap.shape[1:])} but the label has {tuple(truth.shape[1:])}; the preprocessing "
                "could not be inverted"
            )
        row = segmentation_case_metrics(labelmap, truth.as_tensor(), task=task, spacing=_spacing(truth.affine))
        rows.append({"case": record["case"], **row})
        if on_case is not None:
            on_case(record)
    return _site_means(rows), rows


def evaluate_enhancement_volumes(
    model: nn.Module,
    cases: VolumeCases,
    *,
    degrade: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    seed: int,
    device: torch.device,
) -> tuple[dict[str, float], CaseRows]:
    """PSNR/SSIM of the restored whole volume against the source image on its own grid (same normalization)."""
    # MONAI is heavy: imported when first used
    from monai.metrics import PSNRMetric, SSIMMetric
    from monai.transforms import Compose, LoadImaged

    model.eval()
    inferer = sliding_window_inferer(roi_size=cases.roi_size, inference=cases.inference, device=device)
    reference_transform = Compose(
        [
            LoadImaged(keys="image", image_only=True, ensure_channel_first=True, reader="NibabelReader"),
            *cases.reference_intensity,
        ]
    )
    generator = torch.Generator(device="cpu").manual_seed(seed)
    rows: CaseRows = []
    for index, record in enumerate(cases.records):
        item = cases[index]
        clean = item["image"]
        degraded = degrade(clean.as_tensor()[None].float(), generator)[0]
        restored = predict_volume(model, degraded, inferer=inferer, device=device).clamp(0.0, 1.0)
        restored = to_original_grid(restored, image=clean, preprocessing=cases.preprocessing).as_tensor()
        degraded = to_original_grid(degraded, image=clean, preprocessing=cases.preprocessing).as_tensor()
        reference = reference_transform({"image": record["image"]})["image"].as_tensor().float()
        spatial_dims = reference.dim() - 1
        rows.append(
            {
                "case": record["case"],
                "psnr": float(PSNRMetric(max_val=1.0)(restored[None], reference[None]).mean()),
                "ssim": float(
                    SSIMMetric(spatial_dims=spatial_dims, data_range=1.0)(restored[None], reference[None]).mean()
                ),
                "psnr_input": float(PSNRMetric(max_val=1.0)(degraded.clamp(0.0, 1.0)[None], reference[None]).mean()),
                "loss": float(nn.functional.l1_loss(restored, reference)),
            }
        )
    return _site_means(rows), rows


def _site_means(rows: CaseRows) -> dict[str, float]:
    keys = [key for key in (rows[0] if rows else {}) if key != "case"]
    return {key: _finite_mean(torch.tensor([row[key] for row in rows], dtype=torch.float64)) for key in keys}


def _nanmean(values: torch.Tensor) -> float:
    finite = values[~torch.isnan(values)]
    return float(finite.mean()) if finite.numel() else math.nan


def _finite_mean(values: torch.Tensor) -> float:
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if finite.numel() else math.nan

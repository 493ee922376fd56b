"""Apply a trained model to new, unlabelled scans, with the preprocessing it was trained with.

Scan geometry: MONAI's pipeline of the run (reorient, resample, crop, normalize), sliding-window inference,
and `Invertd` back onto each scan's own grid. Fixed grid: the same resize-and-normalize as training
(fedmed.data.fixed_grid) and its inverse. Outputs are on the source file's voxels: a label map
(segmentation), class probabilities (classification) or the restored image in the source's intensity
units (enhancement).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmed.config import RunConfig
from fedmed.data.fixed_grid import to_model_grid, to_source_grid
from fedmed.data.loading import per_image_intensity
from fedmed.data.scans import preprocessing

from .ood import FeatureCollector
from .uncertainty import InvertibleAugmentation, normalized_entropy, segmentation_score, spread
from .volumes import predict_volume, sliding_window_inferer, to_original_grid


@dataclass
class Prediction:
    """One case's output: `volume` (channel-first, on the source grid) or `probabilities` (classification),
    with, when asked for, how sure it is and the features the out-of-distribution check scores."""

    volume: torch.Tensor | None = None
    probabilities: list[float] | None = None
    uncertainty_map: torch.Tensor | None = None  # (1, *source grid): entropy in [0, 1], or the spread (enhancement)
    uncertainty: float | None = None  # the per-case score (see fedmed.tasks.uncertainty)
    features: np.ndarray | None = None  # the first model's pooled deepest features, plain pass
    model_input: torch.Tensor | None = None  # fixed grid: the image as the network saw it (for saliency)


@dataclass(frozen=True)
class _OnModelGrid:
    """A case as the network takes it, and how an output on that grid goes back to the scan's own voxels."""

    tensor: torch.Tensor
    back: Callable[[torch.Tensor], Any]
    source: Any  # the image as read: its intensities undo the normalization of a restored image


class Predictor:
    """The model(s) of a run applied one case at a time (the case's image already read and checked).

    Several models (an ensemble) or test-time augmentations give several passes per case, averaged on the model's grid;
    `uncertainty` then says how much they disagree. One model and no augmentation is the plain prediction."""

    def __init__(
        self,
        models: nn.Module | Sequence[nn.Module],
        *,
        config: RunConfig,
        device: torch.device,
        augmentations: Sequence[InvertibleAugmentation] = (),
        temperature: float | None = None,
        uncertainty: bool = False,
        features: bool = False,
    ) -> None:
        self.models = [m.eval() for m in ([models] if isinstance(models, nn.Module) else models)]
        self.config = config
        self.device = device
        self.augmentations = list(augmentations)
        self.temperature = temperature
        self.uncertainty = uncertainty or len(self.models) > 1 or bool(self.augmentations)
        self.features = features
        self._inferer: Any = None

    @property
    def model(self) -> nn.Module:
        return self.models[0]

    @torch.no_grad()
    def predict(self, image: Any, *, files: list[str]) -> Prediction:
        """`image` is the case read by fedmed.data (channel-first MetaTensor); scan geometry re-reads `files`
        through MONAI's pipeline so its geometry record can be inverted."""
        task = self.config.task
        case = self._scan_input(files) if task.scan_geometry else self._fixed_grid_input(image)
        outputs, features = self._passes(case.tensor)
        if task.kind == "classification":
            prediction = self._classify(outputs)
            prediction.model_input = case.tensor
        elif task.kind == "segmentation":
            prediction = self._segment(outputs, case=case)
        else:
            prediction = self._restore(outputs, case=case)
        prediction.features = features
        return prediction

    def _passes(self, tensor: torch.Tensor) -> tuple[list[torch.Tensor], np.ndarray | None]:
        """The raw network output of every pass (on the model grid, augmentations undone) and the first model's
        pooled features from its plain pass."""
        outputs: list[torch.Tensor] = []
        features = None
        for index, model in enumerate(self.models):
            for augmentation in [None, *self.augmentations]:
                if augmentation is None:
                    if self.features and index == 0:
                        with FeatureCollector(model) as collector:
                            outputs.append(self._forward(model, tensor))
                        features = collector.case_vector()
                    else:
                        outputs.append(self._forward(model, tensor))
                else:
                    output = self._forward(model, augmentation.apply(tensor))
                    # A class score has no grid to put back; a map goes back where it came from.
                    outputs.append(output if self.config.task.kind == "classification" else augmentation.undo(output))
        return outputs, features

    def _forward(self, model: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
        if self.config.task.scan_geometry:
            return predict_volume(model, tensor, inferer=self._scan_inferer(), device=self.device)
        return model(tensor[None].to(self.device)).float().cpu()[0]

    def _classify(self, outputs: list[torch.Tensor]) -> Prediction:
        scale = self.temperature or 1.0
        mean = _mean([(logits / scale).softmax(dim=0) for logits in outputs])
        uncertainty = float(normalized_entropy(mean)[0]) if self.uncertainty else None
        return Prediction(probabilities=[float(value) for value in mean], uncertainty=uncertainty)

    def _segment(self, outputs: list[torch.Tensor], *, case: _OnModelGrid) -> Prediction:
        probabilities = _plain(case.back(_mean([logits.softmax(dim=0) for logits in outputs])))
        labels = probabilities.argmax(dim=0, keepdim=True).to(torch.uint8)
        if not self.uncertainty:
            return Prediction(volume=labels)
        entropy = normalized_entropy(probabilities)
        return Prediction(
            volume=labels, uncertainty_map=entropy, uncertainty=segmentation_score(probabilities, entropy)
        )

    def _restore(self, outputs: list[torch.Tensor], *, case: _OnModelGrid) -> Prediction:
        passes = [output.clamp(0.0, 1.0) for output in outputs]
        restored = _plain(case.back(_mean(passes)))
        task = self.config.task
        volume = _source_intensities(restored, image=case.source, mode=task.intensity, config=self.config)
        if not self.uncertainty:
            return Prediction(volume=volume)
        spread_map = _plain(case.back(spread(torch.stack(passes)))).clamp_min(0.0)
        return Prediction(volume=volume, uncertainty_map=spread_map[:1], uncertainty=float(spread_map.mean()))

    def _fixed_grid_input(self, image: Any) -> _OnModelGrid:
        task = self.config.task
        tensor, record = to_model_grid(
            image, spatial_dims=task.spatial_dims, image_size=task.image_size, intensity=per_image_intensity(task)
        )
        return _OnModelGrid(tensor=tensor, back=lambda output: to_source_grid(output, record), source=image)

    def _scan_input(self, files: list[str]) -> _OnModelGrid:
        config = self.config
        transform = preprocessing(config.task, config.normalization, with_label=False)
        item = transform({"image": files if len(files) > 1 else files[0]})
        image = item["image"]
        source = _read_channels(files) if config.task.kind == "enhancement" else None
        return _OnModelGrid(
            tensor=_plain(image),
            back=lambda output: to_original_grid(output, image=image, preprocessing=transform),
            source=source,
        )

    def _scan_inferer(self) -> Any:
        if self._inferer is None:
            config = self.config
            self._inferer = sliding_window_inferer(
                roi_size=config.roi_size, inference=config.inference, device=self.device
            )
        return self._inferer


def _mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One pass is returned as it is, so the plain prediction is bit for bit the single model's."""
    return tensors[0] if len(tensors) == 1 else torch.stack(tensors).mean(dim=0)


def _source_intensities(restored: torch.Tensor, *, image: Any, mode: str, config: RunConfig) -> torch.Tensor:
    """Undo the per-channel intensity normalization, with the statistics of the image that went in, so the
    restored image is in the scanner's units like its input."""
    values = _plain(image).float().reshape(image.shape[0], -1)
    if mode == "zscore":
        nonzero = config.normalization.foreground == "nonzero" and config.task.scan_geometry
        rows = [row[row != 0] if nonzero and bool((row != 0).any()) else row for row in values]
        offset = torch.stack([row.mean() for row in rows])
        scale = torch.stack([row.std(unbiased=False) for row in rows])
    elif mode == "percentile":
        low, high = config.normalization.percentiles if config.task.scan_geometry else (1.0, 99.0)
        bounds = np.percentile(values.numpy(), [low, high], axis=1)
        offset, scale = torch.as_tensor(bounds[0]), torch.as_tensor(bounds[1] - bounds[0])
    elif mode == "minmax":
        offset, scale = values.min(dim=1).values, values.max(dim=1).values - values.min(dim=1).values
    elif mode == "ct_window":
        width = config.normalization.window_width
        offset = torch.full((values.shape[0],), config.normalization.window_level - width / 2)
        scale = torch.full((values.shape[0],), float(width))
    else:
        return restored
    shape = (-1,) + (1,) * (restored.dim() - 1)
    return restored * scale.float().reshape(shape) + offset.float().reshape(shape)


def _read_channels(files: list[str]) -> torch.Tensor:
    from monai.transforms import LoadImage  # MONAI is heavy: imported when first used

    load = LoadImage(image_only=True, ensure_channel_first=True, reader="NibabelReader")
    return torch.cat([_plain(load(path)) for path in files], dim=0)


def _plain(tensor: Any) -> torch.Tensor:
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor

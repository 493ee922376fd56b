"""Image enhancement: denoising and super-resolution, degraded at the site from clean images.

Inputs are intensities in [0, 1] (TaskConfig enforces percentile/minmax normalization), so PSNR
and SSIM use a data range of 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from fedmed.config import TaskConfig
from fedmed.data.scan_site import VolumeCases

from .base import Sample, Task, batches
from .registry import TASKS
from .volumes import evaluate_enhancement_volumes

EVAL_BATCH = 8
EVAL_NOISE_SEED = 20240611  # fixed so every round and site is scored on the same noisy inputs


@TASKS.register("enhancement")
class EnhancementTask(Task):
    primary_metric = "psnr"

    def __init__(self, config: TaskConfig) -> None:
        super().__init__(config)
        self._mode = "trilinear" if config.spatial_dims == 3 else "bilinear"

    def degrade(self, clean: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        """The network's input: a noisy copy, or a low-resolution copy resampled back to full size."""
        if self.config.enhancement == "denoise":
            noise = torch.randn(clean.shape, generator=generator, device=generator.device)
            return clean + self.config.noise_std * noise.to(clean.device)
        factor = self.config.superres_factor
        if any(size % factor for size in clean.shape[2:]):
            # A whole volume of any size (scan geometry): area averaging is the pooling, rounded up.
            size = [math.ceil(size / factor) for size in clean.shape[2:]]
            low = nn.functional.interpolate(clean, size=size, mode="area")
        else:
            pool = nn.functional.avg_pool3d if self.config.spatial_dims == 3 else nn.functional.avg_pool2d
            low = pool(clean, kernel_size=factor)
        return nn.functional.interpolate(low, size=clean.shape[2:], mode=self._mode, align_corners=False)

    def loss(self, model: nn.Module, batch: Sample, *, generator: torch.Generator) -> torch.Tensor:
        clean = batch["image"]
        return nn.functional.l1_loss(model(self.degrade(clean, generator=generator)), clean)

    def evaluate_cases(
        self, model: nn.Module, samples: Sequence[Sample], *, device: torch.device
    ) -> tuple[dict[str, float], list[dict]]:
        if isinstance(samples, VolumeCases):
            return evaluate_enhancement_volumes(
                model,
                samples,
                degrade=lambda clean, generator: self.degrade(clean, generator=generator),
                seed=EVAL_NOISE_SEED,
                device=device,
            )
        return self.evaluate(model, samples, device=device), []

    @torch.no_grad()
    def evaluate(self, model: nn.Module, samples: Sequence[Sample], *, device: torch.device) -> dict[str, float]:
        if isinstance(samples, VolumeCases):
            return self.evaluate_cases(model, samples, device=device)[0]
        from monai.metrics import PSNRMetric, SSIMMetric  # MONAI is heavy: imported when first used

        dims = self.config.spatial_dims
        psnr, ssim, psnr_input = PSNRMetric(max_val=1.0), SSIMMetric(spatial_dims=dims, data_range=1.0), PSNRMetric(1.0)
        generator = torch.Generator(device="cpu").manual_seed(EVAL_NOISE_SEED)
        model.eval()
        loss_total = 0.0
        for batch in batches(samples, batch_size=EVAL_BATCH, device=torch.device("cpu")):
            clean = batch["image"]
            degraded = self.degrade(clean, generator=generator).to(device)
            restored = model(degraded).float().clamp(0.0, 1.0).cpu()
            loss_total += float(nn.functional.l1_loss(restored, clean, reduction="sum")) / clean[0].numel()
            psnr(restored, clean)
            ssim(restored, clean)
            psnr_input(degraded.cpu().clamp(0.0, 1.0), clean)
        return {
            "psnr": float(psnr.aggregate().item()),
            "ssim": float(ssim.aggregate().item()),
            "psnr_input": float(psnr_input.aggregate().item()),
            "loss": loss_total / max(len(samples), 1),
        }

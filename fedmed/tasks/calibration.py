"""Calibration statistics a site can share without sharing its data: negative log-likelihood sums on a fixed grid
of temperatures (summed over sites, their argmin is the federation's temperature: an exact federated fit of
temperature scaling) and reliability-bin sums (count, confidence, correct), from which the expected calibration
error (ECE) of one site or of all pooled follows.

Classification scores one row per case; segmentation scores voxels, a bounded, seeded subsample per case, so the
cost and what is shared do not grow with the volume. No federation here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .base import Sample, batches
from .ood import FeatureCollector

# 41 log-spaced temperatures from 0.25 to 8: a factor of ~1.09 between neighbours, finer than ECE can tell apart.
TEMPERATURES = np.geomspace(0.25, 8.0, 41)
RELIABILITY_BINS = 15  # equal-width confidence bins, as in Guo et al. (2017)
VOXELS_PER_CASE = 4096  # segmentation: voxels per case scored for calibration, drawn with a fixed seed
SUBSAMPLE_SEED = 20260
EVAL_BATCH = 32


def nll_sums(logits: torch.Tensor, labels: torch.Tensor, *, temperatures: np.ndarray = TEMPERATURES) -> np.ndarray:
    """Summed negative log-likelihood of `labels` (N,) under softmax(`logits` (N, C) / T), one sum per temperature."""
    logits = logits.double()
    sums = [
        float(nn.functional.cross_entropy(logits / float(temperature), labels, reduction="sum"))
        for temperature in temperatures
    ]
    return np.asarray(sums, dtype=np.float64)


def fit_temperature(nll: np.ndarray, *, temperatures: np.ndarray = TEMPERATURES) -> float:
    """The grid temperature with the lowest summed NLL (the first, should several tie)."""
    if len(nll) != len(temperatures):
        raise ValueError(f"{len(nll)} NLL sums for {len(temperatures)} temperatures")
    return float(temperatures[int(np.argmin(nll))])


def reliability_bins(probabilities: torch.Tensor, labels: torch.Tensor, *, bins: int = RELIABILITY_BINS) -> np.ndarray:
    """Per equal-width confidence bin: [count, sum of confidences, number correct], shape (3, bins). Confidence is
    the top class's probability; a confidence of exactly 1 falls in the last bin."""
    confidence, predicted = probabilities.double().max(dim=1)
    correct = (predicted == labels).double()
    index = torch.clamp((confidence * bins).long(), max=bins - 1)
    table = torch.zeros(3, bins, dtype=torch.float64)
    table[0].index_add_(0, index, torch.ones_like(confidence))
    table[1].index_add_(0, index, confidence)
    table[2].index_add_(0, index, correct)
    return table.numpy()


def ece(table: np.ndarray) -> float:
    """Expected calibration error from reliability bins: sum over bins of |correct − confidence| / total; nan for
    no cases."""
    table = np.asarray(table, dtype=np.float64).reshape(3, -1)
    total = table[0].sum()
    if total <= 0:
        return float("nan")
    return float(np.abs(table[2] - table[1]).sum() / total)


def scored_pairs(logits: torch.Tensor, labels: torch.Tensor, *, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (N, C) of logits and their labels (N,) for one case: the case itself (classification) or a seeded
    subsample of its voxels (segmentation; `logits` (C, *spatial), `labels` (1, *spatial) or (*spatial))."""
    if kind == "classification":
        return logits.reshape(1, -1), labels.reshape(1).long()
    flat = logits.reshape(logits.shape[0], -1).T
    truth = labels.reshape(-1).long()
    if len(truth) > VOXELS_PER_CASE:
        generator = torch.Generator().manual_seed(SUBSAMPLE_SEED)
        chosen = torch.randperm(len(truth), generator=generator)[:VOXELS_PER_CASE]
        flat, truth = flat[chosen], truth[chosen]
    return flat, truth


@dataclass
class CaseOutput:
    """One case through the network: its output (channel-first, batch axis removed), its label if it has one, and
    its feature vector (the mean of the deepest pooled feature map over every forward call the case took)."""

    output: torch.Tensor
    label: torch.Tensor | None
    features: np.ndarray
    feature_groups: tuple[int, ...] = ()  # the lengths of the vector's parts (fedmed.tasks.ood.FeatureCollector)


@torch.no_grad()
def case_outputs(
    model: nn.Module,
    samples: Sequence[Sample] | Any,
    *,
    indices: Sequence[int],
    device: torch.device,
    binarize_labels: bool = False,
) -> Iterator[CaseOutput]:
    """The chosen cases through `model`: batched for samples on a fixed grid, one sliding-window pass per whole
    volume (fedmed.data.scan_site.VolumeCases); a volume whose label is a file is compared on the file's grid (the
    output inverted onto it, labels binarized if the task says so)."""
    model.eval()
    with FeatureCollector(model) as collector:
        if hasattr(samples, "roi_size") and hasattr(samples, "inference"):
            yield from _volume_outputs(
                model, samples, indices=indices, device=device, collector=collector, binarize_labels=binarize_labels
            )
            return
        chosen = [samples[index] for index in indices]
        for batch in batches(chosen, batch_size=EVAL_BATCH, device=device):
            collector.reset()
            output = model(batch["image"]).float().cpu()
            rows = collector.rows()
            labels = batch.get("label")
            for position in range(len(output)):
                label = labels[position].cpu() if labels is not None else None
                yield CaseOutput(
                    output=output[position], label=label, features=rows[position], feature_groups=collector.groups
                )


def _volume_outputs(
    model: nn.Module,
    cases: Any,
    *,
    indices: Sequence[int],
    device: torch.device,
    collector: FeatureCollector,
    binarize_labels: bool,
) -> Iterator[CaseOutput]:
    # MONAI is heavy: imported when first used
    from .volumes import predict_volume, read_label, sliding_window_inferer, to_original_grid

    inferer = sliding_window_inferer(roi_size=cases.roi_size, inference=cases.inference, device=device)
    for index in indices:
        item = cases[index]
        collector.reset()
        output = predict_volume(model, item["image"], inferer=inferer, device=device)
        label = item.get("label")
        if isinstance(label, str):  # validation volumes keep their label as stored: compare on the source grid
            output = to_original_grid(output, image=item["image"], preprocessing=cases.preprocessing)
            label = read_label(label, binarize=binarize_labels)
        output = output.as_tensor() if hasattr(output, "as_tensor") else output
        label = label.as_tensor() if hasattr(label, "as_tensor") else label
        yield CaseOutput(output=output, label=label, features=collector.case_vector(), feature_groups=collector.groups)

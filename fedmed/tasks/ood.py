"""How unlike the federation's training data a case is: two of the network's feature maps, pooled over space (mean
and standard deviation per channel), each scored against the training cases' per-dimension mean and variance (a
diagonal Mahalanobis distance); the case's score is the larger of the two.

The first feature map (the network's first convolution, normalization or activation) reacts to how the image looks:
noise, texture, contrast. The deepest one (the smallest spatial size; the last such in call order on a tie: the
deepest layer the whole input has flowed through) reacts to what it shows. Measured on the hippocampus model
(experiments/bench_trust.py): the deepest map alone told CT and brain FLAIR from hippocampus MRI perfectly but
noise-corrupted hippocampus scans hardly at all (AUROC 0.56); the first map's spatial spread caught the noise (0.93).

`FeatureCollector` hooks the network's convolutions, normalizations and activations; it picks both maps on the first
forward call and from then on records them, one row per batch item: [first mean, first std, deepest mean, deepest
std]. Sliding-window inference calls the network once per batch of windows: a case's vector is the mean of its
windows' rows. No federation here.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

EPS = 1e-6
# Scores are binned on fixed log-spaced edges (25 per decade from 1e-3 to 1e5, with 0 and inf at the ends), so
# sites can pool histograms of their validation scores and the threshold needs no score to leave a site.
OOD_SCORE_EDGES = np.concatenate([[0.0], np.geomspace(1e-3, 1e5, 201), [math.inf]])
IN_DISTRIBUTION_QUANTILE = 0.95  # at most 5 % of the sites' validation cases score above the threshold

_FEATURE_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._NormBase,  # batch and instance norm
    nn.GroupNorm,
    nn.LayerNorm,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
)


class FeatureCollector:
    """Records the pooled deepest feature map of every forward call of `model` while active (a context manager)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._handles: list[Any] = []
        # (module index, occurrence within one forward call) of the first and the deepest map
        self._chosen: tuple[tuple[int, int], tuple[int, int]] | None = None
        self._seen: list[tuple[int, int, int, torch.Tensor]] = []  # first call: (module, occurrence, size, pooled)
        self._current: dict[tuple[int, int], torch.Tensor] = {}  # this call's pooled maps, until it ends
        self.groups: tuple[int, ...] = ()  # the lengths of the row's parts: the first map's, then the deepest's
        self._calls: dict[int, int] = {}
        self._rows: list[np.ndarray] = []

    def __enter__(self) -> FeatureCollector:
        modules = [module for module in self.model.modules() if isinstance(module, _FEATURE_MODULES)]
        for index, module in enumerate(modules):
            self._handles.append(module.register_forward_hook(self._hook(index)))
        self._handles.append(self.model.register_forward_pre_hook(self._begin))
        self._handles.append(self.model.register_forward_hook(self._end))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def rows(self) -> np.ndarray:
        """Every recorded row since the last reset, shape (rows, channels); (0, 0) when none."""
        if not self._rows:
            return np.zeros((0, 0))
        return np.concatenate(self._rows, axis=0)

    def case_vector(self) -> np.ndarray:
        """The mean of every row since the last reset: one case's feature vector."""
        rows = self.rows()
        if not len(rows):
            raise ValueError("no forward call recorded since the last reset: run the network on the case first")
        return rows.mean(axis=0)

    def reset(self) -> None:
        self._rows.clear()

    @property
    def chosen(self) -> tuple[tuple[int, int], tuple[int, int]] | None:
        return self._chosen

    def _begin(self, module: nn.Module, args: Any) -> None:
        self._calls.clear()
        self._seen.clear()
        self._current.clear()

    def _hook(self, index: int) -> Callable[..., None]:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            occurrence = self._calls.get(index, 0)
            self._calls[index] = occurrence + 1
            if not isinstance(output, torch.Tensor) or output.dim() < 3:
                return
            if self._chosen is None:
                self._seen.append((index, occurrence, math.prod(output.shape[2:]), _pooled(output)))
            elif (index, occurrence) in self._chosen:
                self._current[(index, occurrence)] = _pooled(output)

        return record

    def _end(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._chosen is None:
            if not self._seen:
                return
            smallest = min(size for _, _, size, _ in self._seen)
            first, deepest = self._seen[0], [entry for entry in self._seen if entry[2] == smallest][-1]
            self._chosen = ((first[0], first[1]), (deepest[0], deepest[1]))
            self._current = {(first[0], first[1]): first[3], (deepest[0], deepest[1]): deepest[3]}
            self._seen.clear()
        parts = [self._current[key] for key in self._chosen if key in self._current]
        if len(parts) == len(self._chosen):
            self.groups = tuple(part.shape[1] for part in parts)
            self._rows.append(torch.cat(parts, dim=1).numpy())
        self._current.clear()


def _pooled(output: torch.Tensor) -> torch.Tensor:
    """(batch, 2 x channels): the spatial mean and standard deviation of a (batch, channels, *spatial) output, in
    float64 on the CPU."""
    values = output.detach().double().flatten(start_dim=2)
    return torch.cat([values.mean(dim=2), values.std(dim=2, unbiased=False)], dim=1).cpu()


def ood_score(
    vector: np.ndarray,
    *,
    mean: np.ndarray | list[float],
    var: np.ndarray | list[float],
    groups: Sequence[int] | None = None,
) -> float:
    """Per group of dimensions (`groups`: their lengths, in order; one group when None), the mean of
    (v − mean)² / (var + eps), a diagonal Mahalanobis distance ~1 for a typical training case; the largest of them."""
    vector, mean, var = (np.asarray(values, dtype=np.float64) for values in (vector, mean, var))
    if vector.shape != mean.shape or mean.shape != var.shape or (groups and sum(groups) != vector.size):
        raise ValueError(
            f"a feature vector of shape {vector.shape} against a reference of shapes {mean.shape} and {var.shape} "
            f"(groups {list(groups or [])}): the model card was built with another network"
        )
    distances = (vector - mean) ** 2 / (var + EPS)
    bounds = np.cumsum([0, *(groups or [vector.size])])
    return float(max(distances[start:end].mean() for start, end in itertools.pairwise(bounds)))


def score_histogram(scores: list[float] | np.ndarray) -> np.ndarray:
    """Counts of `scores` on OOD_SCORE_EDGES."""
    counts, _ = np.histogram(np.asarray(scores, dtype=np.float64), bins=OOD_SCORE_EDGES)
    return counts.astype(np.int64)


def threshold_from_histogram(counts: np.ndarray, *, quantile: float = IN_DISTRIBUTION_QUANTILE) -> float | None:
    """The upper edge of the bin holding the `quantile` of the pooled scores: at most 1 − quantile of them lie
    above it (the bins are ~10 % wide); None for no scores."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return None
    cumulative = np.cumsum(counts)
    position = int(np.searchsorted(cumulative, quantile * total - 1e-9))
    upper = OOD_SCORE_EDGES[position + 1]
    return float(upper if math.isfinite(upper) else OOD_SCORE_EDGES[-2])

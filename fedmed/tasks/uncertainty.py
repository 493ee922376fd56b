"""How sure a prediction is: several passes of one case (test-time flips, or an ensemble of models) combined
into the prediction, a per-voxel uncertainty map and one per-case score.

Passes are averaged on the model's grid (class probabilities, or restored intensities) and put back on the
scan's grid once, so N passes cost N forward passes and one inversion. Test-time augmentations are exactly
invertible and are ones the model learnt to shrug off: flips where it trained with flips (as nnU-Net
mirrors), otherwise shifts by a few voxels and a small intensity gain. A flip the model never saw is no test
of its confidence: in the hippocampus a front-back flip swaps the anterior and posterior labels.

- Segmentation and classification: the predictive entropy of the mean class probabilities, divided by
  log(classes) so 0 is certain and 1 is a coin toss. The case score is the mean entropy over the voxels some
  pass calls foreground (an empty foreground scores 0: nothing was found, consistently).
- Enhancement: the standard deviation across passes (normalized intensity units); the score is its mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

UNCERTAINTY_METHODS = ("none", "tta", "ensemble")
FOREGROUND_SUPPORT = 0.1  # a voxel whose foreground probability passes this in the mean counts for the case score


SHIFT_VOXELS = 2
GAINS = (0.9, 1.1)


@dataclass(frozen=True)
class InvertibleAugmentation:
    """One invertible change of a channel-first tensor (no batch axis): an intensity gain, a shift by whole voxels
    (a roll, undone exactly) and a flip (spatial axes numbered from 1)."""

    flip: tuple[int, ...] = ()
    shift: tuple[int, ...] = ()  # voxels per spatial axis
    gain: float = 1.0

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.gain != 1.0:
            tensor = tensor * self.gain
        if any(self.shift):
            tensor = torch.roll(tensor, shifts=self.shift, dims=tuple(range(1, len(self.shift) + 1)))
        return torch.flip(tensor, dims=list(self.flip)) if self.flip else tensor

    def undo(self, output: torch.Tensor) -> torch.Tensor:
        if self.flip:
            output = torch.flip(output, dims=list(self.flip))
        if any(self.shift):
            back = tuple(-voxels for voxels in self.shift)
            output = torch.roll(output, shifts=back, dims=tuple(range(1, len(back) + 1)))
        return output


def tta_augmentations(
    spatial_dims: int, *, trained_with_flips: bool, count: int | None = None
) -> list[InvertibleAugmentation]:
    """The passes beside the plain one: each axis flipped alone, then all at once (trained with flips), or a
    shift along each axis and the two gains. `count` keeps the first `count`."""
    axes = tuple(range(1, spatial_dims + 1))
    if trained_with_flips:
        augmentations = [InvertibleAugmentation(flip=(axis,)) for axis in axes] + [InvertibleAugmentation(flip=axes)]
    else:
        augmentations = [
            InvertibleAugmentation(shift=tuple(SHIFT_VOXELS * (-1) ** index if a == axis else 0 for a in axes))
            for index, axis in enumerate(axes)
        ] + [InvertibleAugmentation(gain=gain) for gain in GAINS]
    return augmentations if count is None else augmentations[:count]


def normalized_entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """Per voxel (or per case for a vector), the entropy of channel-first class probabilities over log(classes)."""
    classes = probabilities.shape[0]
    p = probabilities.float().clamp_min(1e-12)
    return -(p * p.log()).sum(dim=0, keepdim=True) / math.log(classes)


def segmentation_score(probabilities: torch.Tensor, entropy: torch.Tensor) -> float:
    """Mean entropy over the voxels the mean prediction gives some foreground probability (0 when none)."""
    support = (1.0 - probabilities[0]) > FOREGROUND_SUPPORT
    if not bool(support.any()):
        return 0.0
    return float(entropy[0][support].mean())


def spread(passes: torch.Tensor) -> torch.Tensor:
    """Per voxel, the standard deviation across passes (stacked on axis 0) of a one-channel output."""
    if passes.shape[0] < 2:
        return torch.zeros_like(passes[0])
    return passes.float().std(dim=0, unbiased=False)


def check_method(method: str) -> str:
    if method not in UNCERTAINTY_METHODS:
        raise ValueError(f"uncertainty '{method}' is not known; use {', '.join(UNCERTAINTY_METHODS)}")
    return method

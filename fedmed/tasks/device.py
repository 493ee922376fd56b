"""Pick the compute device: CUDA when present and allowed, CPU otherwise."""

from __future__ import annotations

import torch

from fedmed.core.errors import ConfigError


def select_device(preference: str = "auto") -> torch.device:
    if preference == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if preference == "cuda":
        raise ConfigError("train.device = 'cuda' but no CUDA GPU is visible; set train.device = 'auto' or 'cpu'")
    return torch.device("cpu")

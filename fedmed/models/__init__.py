"""MONAI networks by name (NETWORKS; networks/ holds one file per family), their starting weights (model.init),
which of their parameters stay at the site (FedBN) or stay fixed (model.freeze, dp_sgd.trainable), and the
low-rank adapters DP-SGD trains instead of a convolution's weights.

Imports only fedmed.config and fedmed.core.
"""

from .adapters import low_rank_adapters, trained_values
from .freeze import KeyPartition, freeze_parameters, partition_keys
from .networks import NETWORKS, network
from .pretrained import (
    InitialWeights,
    InitMismatchError,
    StartingModel,
    check_starting_model,
    load_initial_weights,
    starting_model,
)
from .registry import MODEL_NAMES, build_model, shared_keys, site_local_keys
from .trainable import fixed_by_trainable, head_prefixes

__all__ = [
    "MODEL_NAMES",
    "NETWORKS",
    "InitMismatchError",
    "InitialWeights",
    "KeyPartition",
    "StartingModel",
    "build_model",
    "check_starting_model",
    "fixed_by_trainable",
    "freeze_parameters",
    "head_prefixes",
    "load_initial_weights",
    "low_rank_adapters",
    "network",
    "partition_keys",
    "shared_keys",
    "site_local_keys",
    "starting_model",
    "trained_values",
]

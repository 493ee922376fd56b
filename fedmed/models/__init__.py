"""MONAI networks by name (NETWORKS; networks/ holds one file per family), their starting weights (model.init),
and which of their parameters stay at the site (FedBN) or stay fixed (model.freeze).

Imports only fedmed.config and fedmed.core.
"""

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

__all__ = [
    "MODEL_NAMES",
    "NETWORKS",
    "InitMismatchError",
    "InitialWeights",
    "KeyPartition",
    "StartingModel",
    "build_model",
    "check_starting_model",
    "freeze_parameters",
    "load_initial_weights",
    "network",
    "partition_keys",
    "shared_keys",
    "site_local_keys",
    "starting_model",
]

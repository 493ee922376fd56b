"""MONAI networks from a registry, and which of their parameters stay at the site (FedBN).

Imports only fedmed.config and fedmed.core.
"""

from .registry import MODEL_NAMES, build_model, shared_keys, site_local_keys

__all__ = ["MODEL_NAMES", "build_model", "shared_keys", "site_local_keys"]

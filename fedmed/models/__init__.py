"""MONAI networks from a registry, with the parameters each model keeps site-local (FedBN)."""

from .registry import MODEL_NAMES, build_model, site_local_keys

__all__ = ["MODEL_NAMES", "build_model", "site_local_keys"]

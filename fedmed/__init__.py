"""fedmed: federated learning for hospital sites (Flower + MONAI + Opacus)."""

__version__ = "0.1.0"

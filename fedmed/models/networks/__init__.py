"""The networks fedmed builds, by name: `model.name` in a run config picks one registered in NETWORKS.

Adding a network is one new file here whose builder is registered with `@network("name", tasks=...,
description=...)`, and one line below that imports it (importing a file registers its networks).
"""

from __future__ import annotations

from .common import NETWORKS, NetworkBuilder, NetworkEntry, network
from .densenet import densenet121, densenet_small  # noqa: F401 - registers "densenet-small" and "densenet121"
from .residual_unet import residual_unet  # noqa: F401 - registers "residual-unet"
from .segresnet import segresnet  # noqa: F401 - registers "segresnet"
from .unet import segmentation_unet  # noqa: F401 - registers "unet"

__all__ = ["NETWORKS", "NetworkBuilder", "NetworkEntry", "network"]

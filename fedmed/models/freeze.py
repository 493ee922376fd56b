"""Which state-dict entries are trained and sent, which stay at the site, which stay fixed.

- shared: trained at every site, sent as the update and aggregated;
- site-local (FedBN): trained at each site, never sent (fedmed.models.registry.site_local_keys);
- frozen (model.freeze): never trained, never sent; every site and the coordinator keep the starting
  values (model.init's, or the coordinator's random init), so they are bit-identical after the run.

Frozen wins over site-local: a normalization layer under a frozen prefix does not move anywhere.
model.freeze covers parameters; buffers (BatchNorm's running statistics) still follow the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from fedmed.core.errors import ConfigError

from .prefixes import check_prefixes, under_any
from .registry import site_local_keys


@dataclass(frozen=True)
class KeyPartition:
    """A network's state-dict keys by what happens to them in a round, each list in state-dict order."""

    shared: list[str]  # trained, sent and aggregated
    local: list[str]  # FedBN: trained, kept at the site
    frozen: list[str]  # neither trained nor sent

    @property
    def held(self) -> list[str]:
        """What the coordinator holds that the shared update does not carry: site-local and frozen keys."""
        return [*self.local, *self.frozen]


def freeze_parameters(network: nn.Module, prefixes: Sequence[str]) -> list[str]:
    """Stop training the parameters under `prefixes` (requires_grad False, so optimizers and Opacus skip
    them); their names. A prefix that covers no parameter, or freezing all of them, is a ConfigError."""
    if not prefixes:
        return []
    names = [name for name, _ in network.named_parameters()]
    check_prefixes(prefixes, names, field="freeze", what="parameter")
    frozen = [name for name in names if under_any(name, prefixes)]
    if len(frozen) == len(names):
        raise ConfigError(
            f"model.freeze {list(prefixes)} covers every parameter, so nothing would train; freeze only the early "
            "modules (e.g. the feature extractor) and leave the head trainable"
        )
    for name, parameter in network.named_parameters():
        if name in frozen:
            parameter.requires_grad_(False)
    return frozen


def partition_keys(network: nn.Module, *, fedbn: bool, frozen: Sequence[str]) -> KeyPartition:
    """Split the network's state dict: shared, site-local (FedBN) and frozen (fedmed.models.freeze)."""
    fixed = set(frozen)
    state = list(network.state_dict())
    local = {key for key in site_local_keys(network) if key not in fixed} if fedbn else set()
    return KeyPartition(
        shared=[key for key in state if key not in local and key not in fixed],
        local=[key for key in state if key in local],
        frozen=[key for key in state if key in fixed],
    )

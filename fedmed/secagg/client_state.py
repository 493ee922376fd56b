"""A SecAggClient's state between stages, and its round trip through ConfigRecord values.

In deployment every stage runs in a fresh ClientApp process, so everything a later stage needs,
secrets included, must survive as flat record values; a record from another version or node is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedmed.secagg.errors import SecAggProtocolError

IDLE = "idle"  # no round in progress (initial, and after unmask wipes the round's secrets)
STATE_VERSION = 2  # 2: field_bits

_SCALARS = (
    "stage",
    "round_id",
    "num_sites",
    "threshold",
    "clipping_range",
    "max_total_weight",
    "levels",
    "field_bits",
    "num_params",
    "extra_length",
    "sk1",
    "pk1",
    "sk2",
    "pk2",
    "seed",
)
_DICTS = ("pk1s", "pk2s", "seed_shares", "sk1_shares")


@dataclass
class _ClientState:
    node_id: int
    stage: str = IDLE  # the last stage completed
    round_id: str = ""
    num_sites: int = 0
    threshold: int = 0
    clipping_range: float = 0.0
    max_total_weight: int = 0
    levels: int = 0
    field_bits: int = 32
    num_params: int = 0
    extra_length: int = 0
    sk1: bytes = b""  # secret key for pairwise masks; its shares let the server undo a dropped site
    pk1: bytes = b""
    sk2: bytes = b""  # secret key for encrypting shares to neighbours
    pk2: bytes = b""
    seed: bytes = b""  # self-mask seed
    pk1s: dict[int, bytes] = field(default_factory=dict)  # neighbourhood (self included)
    pk2s: dict[int, bytes] = field(default_factory=dict)
    seed_shares: dict[int, bytes] = field(default_factory=dict)  # owner -> share held here
    sk1_shares: dict[int, bytes] = field(default_factory=dict)


def record_from_state(s: _ClientState) -> dict[str, Any]:
    """The full state as ConfigRecord values (int, float, str, bytes, list[int], list[bytes])."""
    record: dict[str, Any] = {"version": STATE_VERSION, "node_id": s.node_id}
    for name in _SCALARS:
        record[name] = getattr(s, name)
    for name in _DICTS:
        mapping: dict[int, bytes] = getattr(s, name)
        record[f"{name}:nids"] = list(mapping)
        record[f"{name}:values"] = list(mapping.values())
    return record


def state_from_record(record: Mapping[str, Any], *, node_id: int) -> _ClientState:
    """The state saved by `record_from_state`, once it is known to be this version's and this node's."""
    if record.get("version") != STATE_VERSION:
        raise SecAggProtocolError(
            f"SecAgg client state has version {record.get('version')!r}, expected {STATE_VERSION}; "
            "a state saved by another fedmed version — clear the site's context state and rerun the round"
        )
    if record.get("node_id") != node_id:
        raise SecAggProtocolError(
            f"SecAgg client state belongs to node {record.get('node_id')!r}, not {node_id}; the "
            "transport loaded another site's state"
        )
    try:
        values: dict[str, Any] = {name: record[name] for name in _SCALARS}
        for name in _DICTS:
            values[name] = dict(zip(record[f"{name}:nids"], record[f"{name}:values"], strict=True))
    except (KeyError, ValueError) as exc:
        raise SecAggProtocolError(
            f"SecAgg client state is incomplete ({exc}); clear the site's context state and rerun the round"
        ) from None
    values["clipping_range"] = float(values["clipping_range"])
    return _ClientState(node_id=node_id, **values)

"""Stage names, message field names and typed field readers shared by client and server.

Every message is a flat mapping of ConfigRecord-compatible values (int, float, str, bytes and
lists of int or bytes); the masked vector is the only array and travels separately (ArrayRecord).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedmed.secagg.errors import SecAggProtocolError

# Stages, in protocol order.
SETUP = "setup"
SHARE_KEYS = "share-keys"
MASKED_INPUT = "masked-input"
UNMASK = "unmask"

# Fields.
STAGE = "stage"
ROUND_ID = "round_id"
NUM_SITES = "num_sites"
THRESHOLD = "threshold"
CLIPPING_RANGE = "clipping_range"
MAX_TOTAL_WEIGHT = "max_total_weight"
LEVELS = "levels"
FIELD_BITS = "field_bits"
NUM_PARAMS = "num_params"
EXTRA_LENGTH = "extra_length"
PK1 = "pk1"  # public key for pairwise masks
PK2 = "pk2"  # public key for encrypting shares
NODE_IDS = "nids"
PK1_LIST = "pk1s"
PK2_LIST = "pk2s"
DESTINATIONS = "dsts"
CIPHERTEXTS = "ctxts"
SOURCES = "srcs"
SEED_COMMITMENT = "seed_commitment"
ACTIVE = "active_nids"
DROPPED = "dropped_nids"
SEED_SHARE_NODES = "seed_share_nids"
SEED_SHARES = "seed_shares"
KEY_SHARE_NODES = "sk_share_nids"
KEY_SHARES = "sk_shares"

_FIX = "both sides must run the same fedmed version and the transport must pass messages unchanged"


def _fail(stage: str, key: str, wanted: str, value: Any) -> SecAggProtocolError:
    shown = type(value).__name__ if not isinstance(value, (int, str)) else repr(value)[:60]
    return SecAggProtocolError(f"SecAgg {stage} message: field '{key}' must be {wanted}, got {shown}; {_FIX}")


def _get(message: Mapping[str, Any], key: str, stage: str) -> Any:
    if key not in message:
        raise SecAggProtocolError(f"SecAgg {stage} message: required field '{key}' is missing; {_FIX}")
    return message[key]


def read_int(message: Mapping[str, Any], key: str, *, stage: str, minimum: int = 0) -> int:
    value = _get(message, key, stage)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _fail(stage, key, f"an integer >= {minimum}", value)
    return value


def read_float(message: Mapping[str, Any], key: str, *, stage: str) -> float:
    value = _get(message, key, stage)
    if not isinstance(value, float):
        raise _fail(stage, key, "a float", value)
    return value


def read_str(message: Mapping[str, Any], key: str, *, stage: str) -> str:
    value = _get(message, key, stage)
    if not isinstance(value, str) or not value:
        raise _fail(stage, key, "a non-empty string", value)
    return value


def read_bytes(message: Mapping[str, Any], key: str, *, stage: str) -> bytes:
    value = _get(message, key, stage)
    if not isinstance(value, bytes) or not value:
        raise _fail(stage, key, "non-empty bytes", value)
    return value


def read_ids(message: Mapping[str, Any], key: str, *, stage: str) -> list[int]:
    """A list of distinct node ids (0 <= id < 2^64)."""
    value = _get(message, key, stage)
    if not isinstance(value, list) or any(
        not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**64 for v in value
    ):
        raise _fail(stage, key, "a list of node ids (integers in [0, 2^64))", value)
    if len(set(value)) != len(value):
        raise _fail(stage, key, "a list of distinct node ids", value)
    return list(value)


def read_bytes_list(message: Mapping[str, Any], key: str, *, stage: str, length: int) -> list[bytes]:
    value = _get(message, key, stage)
    if not isinstance(value, list) or len(value) != length or any(not isinstance(v, bytes) for v in value):
        raise _fail(stage, key, f"a list of {length} bytes values", value)
    return list(value)


def check_header(message: Mapping[str, Any], *, stage: str, round_id: str) -> None:
    """The message belongs to this stage of this round (catches replayed or misrouted messages)."""
    got_stage = _get(message, STAGE, stage)
    if got_stage != stage:
        raise SecAggProtocolError(f"SecAgg: expected a '{stage}' message but got stage {got_stage!r}; {_FIX}")
    got_round = _get(message, ROUND_ID, stage)
    if got_round != round_id:
        raise SecAggProtocolError(
            f"SecAgg {stage} message belongs to round {got_round!r}, not the current round {round_id!r}; "
            "a stale or misrouted message — the transport must not mix rounds"
        )

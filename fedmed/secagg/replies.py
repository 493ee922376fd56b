"""What the SecAgg+ server accepts as each stage's reply: well-formed, for this round, consistent with its request.

A reply that fails raises SecAggProtocolError and the server counts its node as dropped at that stage,
so these checks only read the reply; the round's state stays with the server.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedmed.secagg import messages as m
from fedmed.secagg.errors import SecAggProtocolError
from fedmed.secagg.masking import check_public_key


def read_public_keys(reply: Mapping[str, Any], *, round_id: str) -> tuple[bytes, bytes]:
    m.check_header(reply, stage=m.SETUP, round_id=round_id)
    pk1 = m.read_bytes(reply, m.PK1, stage=m.SETUP)
    pk2 = m.read_bytes(reply, m.PK2, stage=m.SETUP)
    check_public_key(pk1)
    check_public_key(pk2)
    return pk1, pk2


def read_encrypted_shares(
    reply: Mapping[str, Any], *, round_id: str, neighbours: set[int]
) -> tuple[dict[int, bytes], bytes]:
    m.check_header(reply, stage=m.SHARE_KEYS, round_id=round_id)
    dsts = m.read_ids(reply, m.DESTINATIONS, stage=m.SHARE_KEYS)
    ctxts = m.read_bytes_list(reply, m.CIPHERTEXTS, stage=m.SHARE_KEYS, length=len(dsts))
    commitment = m.read_bytes(reply, m.SEED_COMMITMENT, stage=m.SHARE_KEYS)
    if set(dsts) != neighbours:
        raise SecAggProtocolError(
            f"SecAgg share-keys reply: shares addressed to {sorted(dsts)}, expected one for each "
            f"neighbour {sorted(neighbours)}"
        )
    if len(commitment) != 32:
        raise SecAggProtocolError("SecAgg share-keys reply: seed commitment is not 32 bytes")
    return dict(zip(dsts, ctxts, strict=True)), commitment


def read_masked_vector(
    reply: tuple[np.ndarray, Mapping[str, Any]], *, round_id: str, length: int, dtype: type[np.unsignedinteger]
) -> np.ndarray:
    if not isinstance(reply, (tuple, list)) or len(reply) != 2:
        raise SecAggProtocolError("SecAgg masked-input reply must be (field vector, metadata dict)")
    vector, meta = reply
    m.check_header(meta, stage=m.MASKED_INPUT, round_id=round_id)
    if not isinstance(vector, np.ndarray) or vector.dtype != dtype or vector.shape != (length,):
        raise SecAggProtocolError(
            f"SecAgg masked-input reply: vector must be {np.dtype(dtype).name} of shape ({length},), got "
            f"{getattr(vector, 'dtype', type(vector).__name__)} {getattr(vector, 'shape', '')}"
        )
    return vector


def read_unmask_shares(
    reply: Mapping[str, Any], *, round_id: str, requested: tuple[list[int], list[int]]
) -> tuple[list[tuple[int, bytes]], list[tuple[int, bytes]]]:
    m.check_header(reply, stage=m.UNMASK, round_id=round_id)
    active, dropped = requested
    seed_nids = m.read_ids(reply, m.SEED_SHARE_NODES, stage=m.UNMASK)
    key_nids = m.read_ids(reply, m.KEY_SHARE_NODES, stage=m.UNMASK)
    if seed_nids != active or key_nids != dropped:
        raise SecAggProtocolError("SecAgg unmask reply: shares are for other nodes than requested")
    seed_shares = m.read_bytes_list(reply, m.SEED_SHARES, stage=m.UNMASK, length=len(active))
    key_shares = m.read_bytes_list(reply, m.KEY_SHARES, stage=m.UNMASK, length=len(dropped))
    return list(zip(active, seed_shares, strict=True)), list(zip(dropped, key_shares, strict=True))

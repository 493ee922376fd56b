"""SecAggClient: one site's side of a SecAgg+ round, as a state machine over four messages.

setup -> share_keys -> mask -> unmask, each taking the server's message (a flat mapping) and
returning the reply. Between stages the whole state fits in a ConfigRecord (`state_to_record`,
`from_record`), because in deployment every stage runs in a fresh ClientApp process.

Security rules enforced here, whatever the server asks:
- fresh key pairs and a fresh self-mask seed every round (`setup` always regenerates them);
- one masked vector per round: once `mask` has produced it the stage moves on, so the same masks
  never hide two different updates;
- `unmask` reveals, per peer, either the self-mask seed share (peer active) or the mask-key share
  (peer dropped), never both, and only once, and refuses if fewer than `threshold` peers are active.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from cryptography.fernet import InvalidToken

from fedmed.core.log import logger
from fedmed.secagg import messages as m
from fedmed.secagg.client_state import IDLE, _ClientState, record_from_state, state_from_record
from fedmed.secagg.encoding import VectorLayout, encode_contribution, flatten_update
from fedmed.secagg.errors import SecAggProtocolError
from fedmed.secagg.masking import (
    SEED_BYTES,
    apply_pairwise,
    check_public_key,
    pairwise_mask,
    seed_commitment,
    self_mask,
)
from fedmed.secagg.primitives import (
    bytes_to_private_key,
    bytes_to_public_key,
    create_shares,
    decrypt,
    encrypt,
    generate_key_pairs,
    generate_shared_key,
    private_key_to_bytes,
    public_key_to_bytes,
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from fedmed.secagg.quantize import FIELD_BITS, dequantize, quantization_levels, quantize


class SecAggClient:
    """One site's SecAgg+ state machine; see the module docstring for the stages and rules."""

    def __init__(self, *, node_id: int) -> None:
        if isinstance(node_id, bool) or not isinstance(node_id, int) or not 0 <= node_id < 2**64:
            raise SecAggProtocolError(f"node_id must be an integer in [0, 2^64), got {node_id!r}")
        self._s = _ClientState(node_id=node_id)
        self.last_clipped_values = 0  # this site's own count from the last mask(), for its local log

    @property
    def node_id(self) -> int:
        return self._s.node_id

    @property
    def stage(self) -> str:
        """The last stage completed: 'idle', 'setup', 'share-keys' or 'masked-input'."""
        return self._s.stage

    # ------------------------------------------------------------------ stage 0
    def setup(self, message: Mapping[str, Any]) -> dict[str, Any]:
        """Read the round's parameters, make fresh key pairs, return the public keys."""
        stage = m.SETUP
        if message.get(m.STAGE) != stage:
            raise SecAggProtocolError(f"SecAgg: expected a '{stage}' message, got stage {message.get(m.STAGE)!r}")
        round_id = m.read_str(message, m.ROUND_ID, stage=stage)
        if self._s.stage != IDLE:
            logger.warning(
                "SecAgg node %d: setup for round %s restarts round %s (was at stage %s)",
                self.node_id,
                round_id,
                self._s.round_id,
                self._s.stage,
            )
        num_sites = m.read_int(message, m.NUM_SITES, stage=stage, minimum=2)
        threshold = m.read_int(message, m.THRESHOLD, stage=stage, minimum=2)
        clipping_range = m.read_float(message, m.CLIPPING_RANGE, stage=stage)
        max_total_weight = m.read_int(message, m.MAX_TOTAL_WEIGHT, stage=stage, minimum=1)
        levels = m.read_int(message, m.LEVELS, stage=stage, minimum=2)
        field_bits = m.read_int(message, m.FIELD_BITS, stage=stage, minimum=16)
        num_params = m.read_int(message, m.NUM_PARAMS, stage=stage, minimum=1)
        extra_length = m.read_int(message, m.EXTRA_LENGTH, stage=stage)
        if threshold > num_sites:
            raise SecAggProtocolError(
                f"SecAgg setup: threshold {threshold} exceeds the {num_sites} sites of the round; "
                "no secret could be rebuilt — fix the coordinator's reconstruction_threshold"
            )
        if not math.isfinite(clipping_range) or clipping_range <= 0:
            raise SecAggProtocolError(f"SecAgg setup: clipping_range must be finite and > 0, got {clipping_range}")
        if field_bits not in FIELD_BITS:
            raise SecAggProtocolError(f"SecAgg setup: field_bits must be one of {FIELD_BITS}, got {field_bits}")
        # Recompute rather than trust: a larger L than this would let the field's sum wrap.
        expected = quantization_levels(max_total_weight, field_bits=field_bits)
        if levels != expected:
            raise SecAggProtocolError(
                f"SecAgg setup: levels={levels} does not match max_total_weight={max_total_weight} in a "
                f"{field_bits}-bit field (expected {expected}); coordinator and site run different fedmed versions"
            )
        sk1, pk1 = generate_key_pairs()
        sk2, pk2 = generate_key_pairs()
        self._s = _ClientState(
            node_id=self.node_id,
            stage=stage,
            round_id=round_id,
            num_sites=num_sites,
            threshold=threshold,
            clipping_range=clipping_range,
            max_total_weight=max_total_weight,
            levels=levels,
            field_bits=field_bits,
            num_params=num_params,
            extra_length=extra_length,
            sk1=private_key_to_bytes(sk1),
            pk1=public_key_to_bytes(pk1),
            sk2=private_key_to_bytes(sk2),
            pk2=public_key_to_bytes(pk2),
        )
        logger.debug("SecAgg node %d: round %s set up", self.node_id, round_id)
        return {m.STAGE: stage, m.ROUND_ID: round_id, m.PK1: self._s.pk1, m.PK2: self._s.pk2}

    # ------------------------------------------------------------------ stage 1
    def share_keys(self, message: Mapping[str, Any]) -> dict[str, Any]:
        """Check the neighbours' keys, split sk1 and a fresh seed, encrypt one share per neighbour."""
        stage = m.SHARE_KEYS
        s = self._expect(previous=m.SETUP, stage=stage, message=message)
        nids = m.read_ids(message, m.NODE_IDS, stage=stage)
        pk1_list = m.read_bytes_list(message, m.PK1_LIST, stage=stage, length=len(nids))
        pk2_list = m.read_bytes_list(message, m.PK2_LIST, stage=stage, length=len(nids))
        pk1s, pk2s = dict(zip(nids, pk1_list, strict=True)), dict(zip(nids, pk2_list, strict=True))
        if pk1s.get(s.node_id) != s.pk1 or pk2s.get(s.node_id) != s.pk2:
            raise SecAggProtocolError(
                f"SecAgg share-keys: node {s.node_id}'s own public keys are missing or altered in the "
                "neighbour list; refusing (the server or transport tampered with the keys)"
            )
        if len(nids) > s.num_sites:
            raise SecAggProtocolError(
                f"SecAgg share-keys: {len(nids)} neighbours listed but the round has {s.num_sites} sites; refusing"
            )
        all_keys = pk1_list + pk2_list
        for key in all_keys:
            check_public_key(key)
        if len(set(all_keys)) != len(all_keys):
            raise SecAggProtocolError("SecAgg share-keys: two neighbours publish the same public key; refusing")
        if len(nids) < s.threshold:
            raise SecAggProtocolError(
                f"SecAgg share-keys: node {s.node_id} has {len(nids)} neighbours (itself included), fewer "
                f"than the threshold {s.threshold}; refusing — too many sites dropped at setup"
            )
        seed = os.urandom(SEED_BYTES)
        order = sorted(nids)  # share i + 1 goes to the i-th neighbour; the index travels inside the share
        seed_parts = create_shares(seed, s.threshold, len(order))
        sk1_parts = create_shares(s.sk1, s.threshold, len(order))
        sk2 = bytes_to_private_key(s.sk2)
        dsts: list[int] = []
        ciphertexts: list[bytes] = []
        own: tuple[bytes, bytes] = (b"", b"")
        for nid, seed_part, sk1_part in zip(order, seed_parts, sk1_parts, strict=True):
            if nid == s.node_id:
                own = (seed_part, sk1_part)
                continue
            key = generate_shared_key(sk2, bytes_to_public_key(pk2s[nid]))
            dsts.append(nid)
            ciphertexts.append(encrypt(key, share_keys_plaintext_concat(s.node_id, nid, seed_part, sk1_part)))
        s.seed, s.pk1s, s.pk2s, s.stage = seed, pk1s, pk2s, stage
        s.seed_shares, s.sk1_shares = {s.node_id: own[0]}, {s.node_id: own[1]}
        logger.debug("SecAgg node %d: shares for %d neighbours encrypted", s.node_id, len(dsts))
        return {
            m.STAGE: stage,
            m.ROUND_ID: s.round_id,
            m.DESTINATIONS: dsts,
            m.CIPHERTEXTS: ciphertexts,
            m.SEED_COMMITMENT: seed_commitment(seed, round_id=s.round_id),
        }

    # ------------------------------------------------------------------ stage 2
    def mask(
        self,
        message: Mapping[str, Any],
        *,
        update: Sequence[np.ndarray],
        weight: int,
        extra_counts: Sequence[int] | None = None,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Store the neighbours' shares; return the masked vector (of the round's field) and the reply fields.

        `update` is local - global (float arrays, any shapes, C order), `weight` the site's number
        of training examples. The clipped count travels inside the masked vector (the server learns
        only the total); `last_clipped_values` keeps this site's own count for its log.
        """
        stage = m.MASKED_INPUT
        s = self._expect(previous=m.SHARE_KEYS, stage=stage, message=message)
        srcs = m.read_ids(message, m.SOURCES, stage=stage)
        ciphertexts = m.read_bytes_list(message, m.CIPHERTEXTS, stage=stage, length=len(srcs))
        peers = set(s.pk1s) - {s.node_id}
        if not set(srcs) <= peers:
            raise SecAggProtocolError(
                f"SecAgg masked-input: shares arrived from {sorted(set(srcs) - peers)}, which are not "
                f"neighbours of node {s.node_id}; refusing"
            )
        if len(srcs) + 1 < s.threshold:
            raise SecAggProtocolError(
                f"SecAgg masked-input: node {s.node_id} received shares from {len(srcs)} neighbours; with "
                f"itself that is below the threshold {s.threshold}, so its masks could not be removed if "
                "it dropped — refusing; too many sites dropped at share-keys"
            )
        layout = VectorLayout(num_params=s.num_params, extra_length=s.extra_length, field_bits=s.field_bits)
        # Validate and encode the input before touching the round state: a bad input leaves the
        # client at share-keys, so a corrected retry is still possible.
        vector, clipped = encode_contribution(
            flatten_update(update, num_params=s.num_params),
            weight=weight,
            extra_counts=extra_counts,
            layout=layout,
            clipping_range=s.clipping_range,
            levels=s.levels,
            max_total_weight=s.max_total_weight,
            num_sites=s.num_sites,
        )
        seed_shares, sk1_shares = _open_shares(s, srcs=srcs, ciphertexts=ciphertexts)
        vector += self_mask(s.seed, round_id=s.round_id, length=layout.length, dtype=layout.dtype)
        for src in srcs:
            mask = pairwise_mask(s.sk1, s.pk1s[src], round_id=s.round_id, length=layout.length, dtype=layout.dtype)
            apply_pairwise(vector, mask, adder=s.node_id, other=src)
        # Commit before returning: these masks must never hide a second, different vector.
        s.seed_shares, s.sk1_shares, s.stage = seed_shares, sk1_shares, stage
        self.last_clipped_values = clipped
        if clipped:
            logger.warning(
                "SecAgg node %d: %d of %d update values were outside +-%g and were clipped; raise "
                "clipping_range on the coordinator if this recurs",
                s.node_id,
                clipped,
                s.num_params,
                s.clipping_range,
            )
        logger.debug(
            "SecAgg node %d: masked vector of %d values ready (%d pairwise masks)", s.node_id, layout.length, len(srcs)
        )
        return vector, {m.STAGE: stage, m.ROUND_ID: s.round_id}

    def contribution(self, update: Sequence[np.ndarray]) -> np.ndarray:
        """The flat float32 values `update` contributes to the round's mean once clipped and quantized as mask()
        does: what a site keeps the difference to for error feedback."""
        s = self._s
        if s.stage not in (m.SETUP, m.SHARE_KEYS, m.MASKED_INPUT):
            raise SecAggProtocolError(f"SecAgg node {s.node_id}: no round is set up to quantize for")
        levels_vec, _ = quantize(
            flatten_update(update, num_params=s.num_params), clipping_range=s.clipping_range, levels=s.levels
        )
        return dequantize(levels_vec, clipping_range=s.clipping_range, levels=s.levels)

    # ------------------------------------------------------------------ stage 3
    def unmask(self, message: Mapping[str, Any]) -> dict[str, Any]:
        """Reveal seed shares of active peers and key shares of dropped peers, then forget the round."""
        stage = m.UNMASK
        s = self._expect(previous=m.MASKED_INPUT, stage=stage, message=message)
        active = m.read_ids(message, m.ACTIVE, stage=stage)
        dropped = m.read_ids(message, m.DROPPED, stage=stage)
        both = set(active) & set(dropped)
        if both:
            raise SecAggProtocolError(
                f"SecAgg unmask: refusing — nodes {sorted(both)} are listed both active and dropped; "
                "revealing both shares of a node would let the server unmask its individual update"
            )
        if s.node_id not in active:
            raise SecAggProtocolError(
                f"SecAgg unmask: node {s.node_id} is not in the active list it was sent; refusing a malformed request"
            )
        unknown = (set(active) | set(dropped)) - set(s.seed_shares)
        if unknown:
            raise SecAggProtocolError(
                f"SecAgg unmask: node {s.node_id} holds no shares of nodes {sorted(unknown)}; refusing"
            )
        if len(active) < s.threshold:
            raise SecAggProtocolError(
                f"SecAgg unmask: only {len(active)} active nodes in node {s.node_id}'s neighbourhood, below "
                f"the threshold {s.threshold}; refusing, as an aggregate over so few sites would expose them"
            )
        reply = {
            m.STAGE: stage,
            m.ROUND_ID: s.round_id,
            m.SEED_SHARE_NODES: active,
            m.SEED_SHARES: [s.seed_shares[nid] for nid in active],
            m.KEY_SHARE_NODES: dropped,
            m.KEY_SHARES: [s.sk1_shares[nid] for nid in dropped],
        }
        # Forget the round: its secrets are no longer needed and a second unmask must be refused.
        self._s = _ClientState(node_id=s.node_id)
        logger.debug("SecAgg node %d: revealed %d seed shares and %d key shares", s.node_id, len(active), len(dropped))
        return reply

    # ------------------------------------------------------------------ state
    def state_to_record(self) -> dict[str, Any]:
        """The full state as ConfigRecord values (int, float, str, bytes, list[int], list[bytes])."""
        return record_from_state(self._s)

    @classmethod
    def from_record(cls, record: Mapping[str, Any], *, node_id: int) -> SecAggClient:
        """Rebuild a client from `state_to_record()`; an empty record gives a fresh client."""
        client = cls(node_id=node_id)
        if not record:
            return client
        client._s = state_from_record(record, node_id=node_id)
        return client

    # ------------------------------------------------------------------ helpers
    def _expect(self, *, previous: str, stage: str, message: Mapping[str, Any]) -> _ClientState:
        if self._s.stage != previous:
            raise SecAggProtocolError(
                f"SecAgg node {self.node_id}: got a '{stage}' message but the last completed stage is "
                f"'{self._s.stage}' (expected '{previous}'); stages must arrive in order setup, share-keys, "
                "masked-input, unmask — restart the round from setup"
            )
        m.check_header(message, stage=stage, round_id=self._s.round_id)
        return self._s


def _open_shares(
    s: _ClientState, *, srcs: Sequence[int], ciphertexts: Sequence[bytes]
) -> tuple[dict[int, bytes], dict[int, bytes]]:
    """The round's seed and key shares with those the neighbours sent added, each decrypted with the key agreed
    with its sender and checked to be addressed from it to this node."""
    seed_shares, sk1_shares = dict(s.seed_shares), dict(s.sk1_shares)
    sk2 = bytes_to_private_key(s.sk2)
    for src, ciphertext in zip(srcs, ciphertexts, strict=True):
        key = generate_shared_key(sk2, bytes_to_public_key(s.pk2s[src]))
        try:
            plaintext = decrypt(key, ciphertext)
        except InvalidToken:
            raise SecAggProtocolError(
                f"SecAgg masked-input: the share from node {src} does not decrypt with the key agreed with "
                "it; refusing (altered or misrouted ciphertext)"
            ) from None
        actual_src, dst, seed_share, sk1_share = share_keys_plaintext_separate(plaintext)
        if actual_src != src or dst != s.node_id:
            raise SecAggProtocolError(
                f"SecAgg masked-input: a share labelled {src}->{s.node_id} was written {actual_src}->{dst}; "
                "refusing (the server rerouted shares)"
            )
        seed_shares[src], sk1_shares[src] = seed_share, sk1_share
    return seed_shares, sk1_shares

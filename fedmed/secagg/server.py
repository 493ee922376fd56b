"""SecAggServer: the coordinator's side of one SecAgg+ round, as a state machine over four stages.

Each `receive_*` call takes the replies that arrived for the stage (node id -> reply; a missing
node is a dropout, a malformed reply counts as one too) and returns the next stage's messages.

Dropouts, per stage:
- setup / share-keys: the node is excluded before anyone masks with it (at share-keys its peers
  never received its shares, so it must not be part of the masks); the round continues if every
  remaining site still has >= threshold live neighbours (itself included).
- masked-input: its vector is missing; the server asks its neighbours for shares of its mask key
  sk1, rebuilds it and removes the pairwise masks the survivors added for it. The mean is over the
  survivors only.
- unmask: its vector is in the sum; tolerated while every secret still gets >= threshold shares.
If a condition fails the round raises SecAggRoundError (stage, lost nodes, fix): the server never
returns a partial or unverified aggregate.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

import numpy as np
from flwr.common.secure_aggregation.crypto.shamir import combine_shares

from fedmed.log import logger
from fedmed.secagg import messages as m
from fedmed.secagg.encoding import VectorLayout, decode_sum, unflatten
from fedmed.secagg.errors import SecAggInputError, SecAggProtocolError, SecAggRoundError
from fedmed.secagg.masking import (
    SEED_BYTES,
    apply_pairwise,
    check_public_key,
    pairwise_mask,
    public_key_of,
    seed_commitment,
    self_mask,
)
from fedmed.secagg.neighbours import build_neighbourhoods, neighbourhood_size, resolve_threshold
from fedmed.secagg.quantize import MODULUS, dequantize_mean
from fedmed.secagg.settings import SecAggSettings

T = TypeVar("T")

_DONE = "done"
_FAILED = "failed"
_FINISHED = "finished"
_NEXT_CALL = {m.SETUP: "setup_messages", m.SHARE_KEYS: "receive_public_keys",
              m.MASKED_INPUT: "receive_encrypted_shares", m.UNMASK: "receive_masked_vectors",
              _DONE: "receive_unmask_shares"}


@dataclass(frozen=True)
class SecAggResult:
    """The unmasked aggregate of one round.

    mean_update: sum_i w_i delta_i / sum_i w_i over `sites_aggregated`, float32, in the round's shapes,
        within `max_quantization_error` (per element) of the exact mean of the clipped updates.
    total_weight: sum_i w_i over the aggregated sites (the server never sees an individual w_i).
    extra_sums: per-position sums of the sites' extra_counts (int64), None if the round had none.
    sites_dropped: node -> stage at which it was lost; those sites are not in the mean.
    sites_silent_at_unmask: aggregated sites that did not answer the unmask stage (tolerated).
    clipped_values: update values clipped to +-clipping_range, summed over the aggregated sites.
    """

    mean_update: list[np.ndarray]
    total_weight: int
    extra_sums: np.ndarray | None
    sites_aggregated: list[int]
    sites_dropped: dict[int, str]
    max_quantization_error: float
    clipped_values: int
    sites_silent_at_unmask: list[int] = field(default_factory=list)


class SecAggServer:
    """One SecAgg+ round on the coordinator; see the module docstring for dropout handling."""

    def __init__(self, *, node_ids: Sequence[int], shapes: Sequence[Sequence[int]],
                 settings: SecAggSettings | None = None, extra_length: int = 0,
                 round_id: str | None = None, shuffle_seed: int | None = None) -> None:
        self.settings = settings or SecAggSettings()
        ids = list(node_ids)
        if len(ids) < 2:
            raise SecAggInputError(
                f"secure aggregation needs at least 2 sites, got {len(ids)}; a single site's 'aggregate' "
                "is its own update")
        if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < 2**64 for i in ids) \
                or len(set(ids)) != len(ids):
            raise SecAggInputError(f"node_ids must be distinct integers in [0, 2^64), got {ids}")
        self._shapes = [tuple(int(d) for d in shape) for shape in shapes]
        num_params = sum(int(np.prod(shape, dtype=np.int64)) for shape in self._shapes)
        if num_params < 1:
            raise SecAggInputError(f"shapes {self._shapes} hold no values; pass the model's update shapes")
        if isinstance(extra_length, bool) or not isinstance(extra_length, int) or extra_length < 0:
            raise SecAggInputError(f"extra_length must be an integer >= 0, got {extra_length!r}")
        n = len(ids)
        # Sums that must not wrap modulo 2^32: the weights and the clipped counts.
        if n * self.settings.max_total_weight >= MODULUS or n * num_params >= MODULUS:
            raise SecAggInputError(
                f"{n} sites x max_total_weight {self.settings.max_total_weight} (or x {num_params} values) "
                "reaches 2^32, so the weight or clip-count sum could wrap; lower max_total_weight")
        self.layout = VectorLayout(num_params=num_params, extra_length=extra_length)
        self.round_id = round_id or secrets.token_hex(8)
        self._sampled = sorted(ids)
        rng = random.Random(shuffle_seed) if shuffle_seed is not None else random.SystemRandom()
        self._nbrs = build_neighbourhoods(self._sampled, num_shares=self.settings.num_shares, rng=rng)
        k = neighbourhood_size(n, self.settings.num_shares)
        self.threshold = resolve_threshold(self.settings.reconstruction_threshold, neighbourhood=k)
        if self.threshold <= k // 2:
            logger.warning(
                "SecAgg: reconstruction_threshold %d is not a majority of the %d-site neighbourhood; a "
                "server lying about dropouts could collect both secrets of a site", self.threshold, k)
        self._next = m.SETUP
        self._expected: set[int] = set()
        self._dropped: dict[int, str] = {}
        self._reasons: dict[int, str] = {}
        self._silent_at_unmask: list[int] = []
        self._pk1: dict[int, bytes] = {}
        self._sent_nbrs: dict[int, set[int]] = {}
        self._commitments: dict[int, bytes] = {}
        self._shared: set[int] = set()
        self._masked: set[int] = set()
        self._unmask_requests: dict[int, tuple[list[int], list[int]]] = {}
        self._sum: np.ndarray | None = None
        logger.info("SecAgg round %s: %d sites, neighbourhood %d, threshold %d, %d values (+%d)",
                    self.round_id, n, k, self.threshold, num_params, 2 + extra_length)

    # ------------------------------------------------------------------ views
    @property
    def vector_length(self) -> int:
        """Length of every masked uint32 vector: parameters + weight + clipped count + extras."""
        return self.layout.length

    @property
    def neighbourhoods(self) -> dict[int, frozenset[int]]:
        return dict(self._nbrs)

    @property
    def active_nodes(self) -> list[int]:
        """Nodes still in the round (those the last messages went to)."""
        return sorted(self._expected) if self._expected else list(self._sampled)

    @property
    def sites_dropped(self) -> dict[int, str]:
        return dict(self._dropped)

    # ------------------------------------------------------------------ stage 0
    def setup_messages(self) -> dict[int, dict[str, Any]]:
        """The setup message per node: the round's parameters."""
        self._advance(m.SETUP)
        s = self.settings
        common = {
            m.STAGE: m.SETUP, m.ROUND_ID: self.round_id, m.NUM_SITES: len(self._sampled),
            m.THRESHOLD: self.threshold, m.CLIPPING_RANGE: float(s.clipping_range),
            m.MAX_TOTAL_WEIGHT: s.max_total_weight, m.LEVELS: s.levels,
            m.NUM_PARAMS: self.layout.num_params, m.EXTRA_LENGTH: self.layout.extra_length,
        }
        self._expected = set(self._sampled)
        self._next = m.SHARE_KEYS
        return {nid: dict(common) for nid in self._sampled}

    # ------------------------------------------------------------------ stage 1
    def receive_public_keys(self, replies: Mapping[int, Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
        """Public keys in; per node, its live neighbours' public keys out (share-keys messages)."""
        self._advance(m.SHARE_KEYS)

        def parse(nid: int, reply: Mapping[str, Any]) -> tuple[bytes, bytes]:
            m.check_header(reply, stage=m.SETUP, round_id=self.round_id)
            pk1 = m.read_bytes(reply, m.PK1, stage=m.SETUP)
            pk2 = m.read_bytes(reply, m.PK2, stage=m.SETUP)
            check_public_key(pk1)
            check_public_key(pk2)
            return pk1, pk2

        keys = self._collect(replies, stage=m.SETUP, parse=parse)
        owners: dict[bytes, list[int]] = {}
        for nid, (pk1, pk2) in keys.items():
            for key in {pk1, pk2}:
                owners.setdefault(key, []).append(nid)
        for nids in owners.values():
            if len(nids) > 1:  # a copied key would let one site derive another's masks
                for nid in nids:
                    if keys.pop(nid, None) is not None:
                        self._lose(nid, m.SETUP, f"public key shared with nodes {nids}")
        self._require_coverage(set(keys), owners=set(keys), stage=m.SETUP, what="live neighbours")
        self._pk1 = {nid: pk1 for nid, (pk1, _) in keys.items()}
        out: dict[int, dict[str, Any]] = {}
        for nid in sorted(keys):
            nbrs = sorted(self._nbrs[nid] & set(keys))
            self._sent_nbrs[nid] = set(nbrs)
            out[nid] = {m.STAGE: m.SHARE_KEYS, m.ROUND_ID: self.round_id, m.NODE_IDS: nbrs,
                        m.PK1_LIST: [keys[v][0] for v in nbrs], m.PK2_LIST: [keys[v][1] for v in nbrs]}
        self._expected = set(keys)
        self._next = m.MASKED_INPUT
        return out

    # ------------------------------------------------------------------ stage 2
    def receive_encrypted_shares(self, replies: Mapping[int, Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
        """Encrypted shares in; per node, the ciphertexts addressed to it out (masked-input messages)."""
        self._advance(m.MASKED_INPUT)

        def parse(nid: int, reply: Mapping[str, Any]) -> tuple[dict[int, bytes], bytes]:
            m.check_header(reply, stage=m.SHARE_KEYS, round_id=self.round_id)
            dsts = m.read_ids(reply, m.DESTINATIONS, stage=m.SHARE_KEYS)
            ctxts = m.read_bytes_list(reply, m.CIPHERTEXTS, stage=m.SHARE_KEYS, length=len(dsts))
            commitment = m.read_bytes(reply, m.SEED_COMMITMENT, stage=m.SHARE_KEYS)
            if set(dsts) != self._sent_nbrs[nid] - {nid}:
                raise SecAggProtocolError(
                    f"SecAgg share-keys reply: shares addressed to {sorted(dsts)}, expected one for each "
                    f"neighbour {sorted(self._sent_nbrs[nid] - {nid})}")
            if len(commitment) != 32:
                raise SecAggProtocolError("SecAgg share-keys reply: seed commitment is not 32 bytes")
            return dict(zip(dsts, ctxts, strict=True)), commitment

        shares = self._collect(replies, stage=m.SHARE_KEYS, parse=parse)
        shared = set(shares)
        self._require_coverage(shared, owners=shared, stage=m.SHARE_KEYS, what="neighbours holding its shares")
        self._shared = shared
        self._commitments = {nid: commitment for nid, (_, commitment) in shares.items()}
        out: dict[int, dict[str, Any]] = {}
        for dst in sorted(shared):
            srcs = sorted((self._nbrs[dst] & shared) - {dst})
            out[dst] = {m.STAGE: m.MASKED_INPUT, m.ROUND_ID: self.round_id, m.SOURCES: srcs,
                        m.CIPHERTEXTS: [shares[src][0][dst] for src in srcs]}
        self._expected = set(shared)
        self._next = m.UNMASK
        return out

    # ------------------------------------------------------------------ stage 3
    def receive_masked_vectors(
            self, replies: Mapping[int, tuple[np.ndarray, Mapping[str, Any]]]) -> dict[int, dict[str, Any]]:
        """Masked vectors in (summed at once, never kept); unmask requests out."""
        self._advance(m.UNMASK)
        length = self.layout.length

        def parse(nid: int, reply: tuple[np.ndarray, Mapping[str, Any]]) -> np.ndarray:
            if not isinstance(reply, (tuple, list)) or len(reply) != 2:
                raise SecAggProtocolError("SecAgg masked-input reply must be (uint32 vector, metadata dict)")
            vector, meta = reply
            m.check_header(meta, stage=m.MASKED_INPUT, round_id=self.round_id)
            if not isinstance(vector, np.ndarray) or vector.dtype != np.uint32 or vector.shape != (length,):
                raise SecAggProtocolError(
                    f"SecAgg masked-input reply: vector must be uint32 of shape ({length},), got "
                    f"{getattr(vector, 'dtype', type(vector).__name__)} {getattr(vector, 'shape', '')}")
            return vector

        vectors = self._collect(replies, stage=m.MASKED_INPUT, parse=parse)
        masked = set(vectors)
        # Every secret (seeds of the masked, mask keys of the dropped) needs threshold live holders.
        self._require_coverage(self._shared, owners=masked, stage=m.MASKED_INPUT,
                               what="masked-input survivors holding its shares")
        total = np.zeros(length, dtype=np.uint32)
        for vector in vectors.values():
            total += vector  # wraps modulo 2^32 by design
        self._sum, self._masked = total, masked
        dropped_now = self._shared - masked
        out: dict[int, dict[str, Any]] = {}
        for nid in sorted(masked):
            active = sorted(self._nbrs[nid] & masked)
            dropped = sorted(self._nbrs[nid] & dropped_now)
            self._unmask_requests[nid] = (active, dropped)
            out[nid] = {m.STAGE: m.UNMASK, m.ROUND_ID: self.round_id, m.ACTIVE: active, m.DROPPED: dropped}
        self._expected = set(masked)
        self._next = _DONE
        return out

    # ------------------------------------------------------------------ stage 4
    def receive_unmask_shares(self, replies: Mapping[int, Mapping[str, Any]]) -> SecAggResult:
        """Shares in; rebuild seeds and dropped keys, remove every mask, decode and verify the mean."""
        self._advance(_DONE)

        def parse(nid: int, reply: Mapping[str, Any]) -> tuple[list[tuple[int, bytes]], list[tuple[int, bytes]]]:
            m.check_header(reply, stage=m.UNMASK, round_id=self.round_id)
            active, dropped = self._unmask_requests[nid]
            seed_nids = m.read_ids(reply, m.SEED_SHARE_NODES, stage=m.UNMASK)
            key_nids = m.read_ids(reply, m.KEY_SHARE_NODES, stage=m.UNMASK)
            if seed_nids != active or key_nids != dropped:
                raise SecAggProtocolError("SecAgg unmask reply: shares are for other nodes than requested")
            seed_shares = m.read_bytes_list(reply, m.SEED_SHARES, stage=m.UNMASK, length=len(active))
            key_shares = m.read_bytes_list(reply, m.KEY_SHARES, stage=m.UNMASK, length=len(dropped))
            return list(zip(active, seed_shares, strict=True)), list(zip(dropped, key_shares, strict=True))

        answers = self._collect(replies, stage=m.UNMASK, parse=parse)
        seed_shares: dict[int, list[bytes]] = {nid: [] for nid in self._masked}
        key_shares: dict[int, list[bytes]] = {nid: [] for nid in self._shared - self._masked}
        for nid in sorted(answers):
            for owner, share in answers[nid][0]:
                seed_shares[owner].append(share)
            for owner, share in answers[nid][1]:
                key_shares[owner].append(share)
        short = {owner: len(got) for owner, got in {**seed_shares, **key_shares}.items() if len(got) < self.threshold}
        if short:
            detail = ", ".join(f"node {o}: {c} of {self.threshold}" for o, c in sorted(short.items()))
            self._fail(m.UNMASK, f"too few shares arrived to rebuild the masks ({detail})",
                       fix=self._survivor_fix())

        assert self._sum is not None
        total = self._sum
        length = self.layout.length
        for owner in sorted(seed_shares):
            seed = self._combine(seed_shares[owner], owner=owner, what="self-mask seed")
            if len(seed) != SEED_BYTES or seed_commitment(seed, round_id=self.round_id) != self._commitments[owner]:
                self._fail(m.UNMASK, f"the rebuilt self-mask seed of node {owner} does not match its commitment "
                           "(corrupt shares)", fix="rerun the round; if it recurs, check the sites' fedmed versions")
            total -= self_mask(seed, round_id=self.round_id, length=length)
        for owner in sorted(key_shares):
            sk1 = self._combine(key_shares[owner], owner=owner, what="mask key")
            try:
                matches = public_key_of(sk1) == self._pk1[owner]
            except (ValueError, TypeError):
                matches = False
            if not matches:
                self._fail(m.UNMASK, f"the rebuilt mask key of dropped node {owner} does not match its public key "
                           "(corrupt shares)", fix="rerun the round; if it recurs, check the sites' fedmed versions")
            # Only survivors' vectors carry a mask shared with the dropped node; undo each of them.
            for peer in sorted((self._nbrs[owner] & self._masked) - {owner}):
                mask = pairwise_mask(sk1, self._pk1[peer], round_id=self.round_id, length=length)
                apply_pairwise(total, mask, adder=peer, other=owner, sign=-1)
        self._sum = None
        result = self._decode(total)
        self._next = _FINISHED
        logger.info("SecAgg round %s: aggregated %d sites (total weight %d), dropped %s",
                    self.round_id, len(self._masked), result.total_weight, self._dropped or "none")
        if result.clipped_values:
            logger.warning("SecAgg round %s: %d update values were clipped to +-%g across sites; raise "
                           "clipping_range if this recurs", self.round_id, result.clipped_values,
                           self.settings.clipping_range)
        return result

    # ------------------------------------------------------------------ helpers
    def _decode(self, total: np.ndarray) -> SecAggResult:
        decoded = decode_sum(total, layout=self.layout)
        s = self.settings
        weight = decoded.total_weight
        if not 1 <= weight <= s.max_total_weight:
            self._fail(m.UNMASK, f"the total weight of the aggregated sites is {weight}, outside [1, "
                       f"max_total_weight={s.max_total_weight}], so the weighted sum may have wrapped modulo 2^32",
                       fix=f"set SecAggSettings.max_total_weight to at least {max(weight, 1)} (the training "
                       "examples of all sites in one round) and rerun")
        # Each element is sum_i w_i q_i <= W * L; anything larger means a mask was not removed.
        if decoded.weighted_sum.size and int(decoded.weighted_sum.max()) > weight * s.levels:
            self._fail(m.UNMASK, "the unmasked sum is out of range: masks did not cancel",
                       fix="rerun the round; check that every site runs the same fedmed version")
        mean = dequantize_mean(decoded.weighted_sum, total_weight=weight,
                               clipping_range=float(s.clipping_range), levels=s.levels)
        return SecAggResult(
            mean_update=unflatten(mean, self._shapes), total_weight=weight, extra_sums=decoded.extra_sums,
            sites_aggregated=sorted(self._masked), sites_dropped=dict(self._dropped),
            max_quantization_error=s.max_quantization_error, clipped_values=decoded.clipped_values,
            sites_silent_at_unmask=list(self._silent_at_unmask))

    def _combine(self, shares: list[bytes], *, owner: int, what: str) -> bytes:
        try:
            # Any `threshold` shares determine the secret; more add only work.
            return combine_shares(shares[: self.threshold])
        except (ValueError, IndexError):
            self._fail(m.UNMASK, f"the {what} of node {owner} could not be rebuilt from its shares (corrupt shares)",
                       fix="rerun the round; if it recurs, check the sites' fedmed versions")

    def _advance(self, stage: str) -> None:
        if self._next != stage:
            if self._next in (_FAILED, _FINISHED):
                raise SecAggProtocolError(
                    f"SecAgg round {self.round_id} is {self._next}; start a new round with a new SecAggServer")
            raise SecAggProtocolError(
                f"SecAgg round {self.round_id}: called the '{stage}' step out of order; call "
                f"{_NEXT_CALL[self._next]}() next")

    def _collect(self, replies: Mapping[int, T], *, stage: str,
                 parse: Callable[[int, T], Any]) -> dict[int, Any]:
        unexpected = set(replies) - self._expected
        if unexpected:
            self._next = _FAILED
            raise SecAggProtocolError(
                f"SecAgg round {self.round_id}: {stage} replies from nodes {sorted(unexpected)}, which were not "
                "sent a message at this stage; the transport must pass only this stage's replies")
        good: dict[int, Any] = {}
        for nid in sorted(self._expected):
            if nid not in replies:
                self._lose(nid, stage, "no reply")
                continue
            try:
                good[nid] = parse(nid, replies[nid])
            except SecAggProtocolError as exc:
                self._lose(nid, stage, f"malformed reply: {exc}")
        return good

    def _lose(self, nid: int, stage: str, reason: str) -> None:
        if stage == m.UNMASK:
            self._silent_at_unmask.append(nid)  # its vector is already in the sum: still aggregated
        else:
            self._dropped[nid] = stage
        self._reasons[nid] = f"{stage}: {reason}"
        logger.warning("SecAgg round %s: node %d lost at stage %s (%s)", self.round_id, nid, stage, reason)

    def _require_coverage(self, owners_pool: set[int], *, owners: set[int], stage: str, what: str) -> None:
        """Every node in `owners_pool` needs >= threshold members of `owners` in its neighbourhood."""
        if len(owners) < self.threshold:
            self._fail(stage, f"only {len(owners)} sites remain, fewer than the threshold {self.threshold}",
                       fix=self._survivor_fix())
        short = {nid: len(self._nbrs[nid] & owners) for nid in owners_pool
                 if len(self._nbrs[nid] & owners) < self.threshold}
        if short:
            detail = ", ".join(f"node {nid}: {count}" for nid, count in sorted(short.items()))
            self._fail(stage, f"some sites have fewer than {self.threshold} {what} ({detail})",
                       fix=self._survivor_fix())

    def _survivor_fix(self) -> str:
        return (f"bring the lost sites back online (check their logs and network) and rerun the round; each "
                f"site needs {self.threshold} live sites in its neighbourhood. Lowering "
                "reconstruction_threshold tolerates more dropouts but weakens protection against a server "
                "that lies about dropouts")

    def _fail(self, stage: str, reason: str, *, fix: str) -> NoReturn:
        self._next = _FAILED
        self._sum = None
        lost = ", ".join(f"node {nid} ({self._reasons[nid]})" for nid in sorted(self._reasons)) or "none"
        message = (f"SecAgg round {self.round_id} failed at stage '{stage}': {reason}. Nodes lost: {lost}. "
                   f"No aggregate is returned. Fix: {fix}")
        logger.error("%s", message)
        lost_map = dict(self._dropped)
        lost_map.update({nid: m.UNMASK for nid in self._silent_at_unmask})
        raise SecAggRoundError(message, stage=stage, lost=lost_map)

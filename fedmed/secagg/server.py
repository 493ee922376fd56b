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
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedmed.core.log import logger
from fedmed.secagg import messages as m
from fedmed.secagg.dropouts import _FAILED, DropoutBookkeeping
from fedmed.secagg.encoding import VectorLayout
from fedmed.secagg.errors import SecAggInputError, SecAggProtocolError
from fedmed.secagg.neighbours import build_neighbourhoods, neighbourhood_size, resolve_threshold
from fedmed.secagg.replies import read_encrypted_shares, read_masked_vector, read_public_keys, read_unmask_shares
from fedmed.secagg.settings import SecAggSettings
from fedmed.secagg.unmasking import SecAggResult, decode_result, remove_masks

_DONE = "done"
_FINISHED = "finished"
_NEXT_CALL = {
    m.SETUP: "setup_messages",
    m.SHARE_KEYS: "receive_public_keys",
    m.MASKED_INPUT: "receive_encrypted_shares",
    m.UNMASK: "receive_masked_vectors",
    _DONE: "receive_unmask_shares",
}


class SecAggServer(DropoutBookkeeping):
    """One SecAgg+ round on the coordinator; see the module docstring for dropout handling."""

    def __init__(
        self,
        *,
        node_ids: Sequence[int],
        shapes: Sequence[Sequence[int]],
        settings: SecAggSettings | None = None,
        extra_length: int = 0,
        round_id: str | None = None,
        shuffle_seed: int | None = None,
    ) -> None:
        self.settings = settings or SecAggSettings()
        ids = list(node_ids)
        if len(ids) < 2:
            raise SecAggInputError(
                f"secure aggregation needs at least 2 sites, got {len(ids)}; a single site's 'aggregate' "
                "is its own update"
            )
        if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < 2**64 for i in ids) or len(
            set(ids)
        ) != len(ids):
            raise SecAggInputError(f"node_ids must be distinct integers in [0, 2^64), got {ids}")
        self._shapes = [tuple(int(d) for d in shape) for shape in shapes]
        num_params = sum(int(np.prod(shape, dtype=np.int64)) for shape in self._shapes)
        if num_params < 1:
            raise SecAggInputError(f"shapes {self._shapes} hold no values; pass the model's update shapes")
        if isinstance(extra_length, bool) or not isinstance(extra_length, int) or extra_length < 0:
            raise SecAggInputError(f"extra_length must be an integer >= 0, got {extra_length!r}")
        n = len(ids)
        # A sum that must not wrap modulo 2^b: the weights (the clipped counts are capped per site).
        modulus = 2**self.settings.field_bits
        if n * self.settings.max_total_weight >= modulus:
            raise SecAggInputError(
                f"{n} sites x max_total_weight {self.settings.max_total_weight} reaches 2^{self.settings.field_bits}, "
                "so the weight sum could wrap; lower max_total_weight"
            )
        self.layout = VectorLayout(
            num_params=num_params, extra_length=extra_length, field_bits=self.settings.field_bits
        )
        self.round_id = round_id or secrets.token_hex(8)
        self._sampled = sorted(ids)
        rng = random.Random(shuffle_seed) if shuffle_seed is not None else random.SystemRandom()
        self._nbrs = build_neighbourhoods(self._sampled, num_shares=self.settings.num_shares, rng=rng)
        k = neighbourhood_size(n, self.settings.num_shares)
        self.threshold = resolve_threshold(self.settings.reconstruction_threshold, neighbourhood=k)
        if self.threshold <= k // 2:
            logger.warning(
                "SecAgg: reconstruction_threshold %d is not a majority of the %d-site neighbourhood; a "
                "server lying about dropouts could collect both secrets of a site",
                self.threshold,
                k,
            )
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
        logger.info(
            "SecAgg round %s: %d sites, neighbourhood %d, threshold %d, %d values (+%d)",
            self.round_id,
            n,
            k,
            self.threshold,
            num_params,
            2 + extra_length,
        )

    # ------------------------------------------------------------------ views
    @property
    def vector_length(self) -> int:
        """Length of every masked vector: parameters + weight + clipped count + extras."""
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
            m.STAGE: m.SETUP,
            m.ROUND_ID: self.round_id,
            m.NUM_SITES: len(self._sampled),
            m.THRESHOLD: self.threshold,
            m.CLIPPING_RANGE: float(s.clipping_range),
            m.MAX_TOTAL_WEIGHT: s.max_total_weight,
            m.LEVELS: s.levels,
            m.FIELD_BITS: s.field_bits,
            m.NUM_PARAMS: self.layout.num_params,
            m.EXTRA_LENGTH: self.layout.extra_length,
        }
        self._expected = set(self._sampled)
        self._next = m.SHARE_KEYS
        return {nid: dict(common) for nid in self._sampled}

    # ------------------------------------------------------------------ stage 1
    def receive_public_keys(self, replies: Mapping[int, Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
        """Public keys in; per node, its live neighbours' public keys out (share-keys messages)."""
        self._advance(m.SHARE_KEYS)

        keys = self._collect(
            replies, stage=m.SETUP, parse=lambda nid, reply: read_public_keys(reply, round_id=self.round_id)
        )
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
            out[nid] = {
                m.STAGE: m.SHARE_KEYS,
                m.ROUND_ID: self.round_id,
                m.NODE_IDS: nbrs,
                m.PK1_LIST: [keys[v][0] for v in nbrs],
                m.PK2_LIST: [keys[v][1] for v in nbrs],
            }
        self._expected = set(keys)
        self._next = m.MASKED_INPUT
        return out

    # ------------------------------------------------------------------ stage 2
    def receive_encrypted_shares(self, replies: Mapping[int, Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
        """Encrypted shares in; per node, the ciphertexts addressed to it out (masked-input messages)."""
        self._advance(m.MASKED_INPUT)

        shares = self._collect(
            replies,
            stage=m.SHARE_KEYS,
            parse=lambda nid, reply: read_encrypted_shares(
                reply, round_id=self.round_id, neighbours=self._sent_nbrs[nid] - {nid}
            ),
        )
        shared = set(shares)
        self._require_coverage(shared, owners=shared, stage=m.SHARE_KEYS, what="neighbours holding its shares")
        self._shared = shared
        self._commitments = {nid: commitment for nid, (_, commitment) in shares.items()}
        out: dict[int, dict[str, Any]] = {}
        for dst in sorted(shared):
            srcs = sorted((self._nbrs[dst] & shared) - {dst})
            out[dst] = {
                m.STAGE: m.MASKED_INPUT,
                m.ROUND_ID: self.round_id,
                m.SOURCES: srcs,
                m.CIPHERTEXTS: [shares[src][0][dst] for src in srcs],
            }
        self._expected = set(shared)
        self._next = m.UNMASK
        return out

    # ------------------------------------------------------------------ stage 3
    def receive_masked_vectors(
        self, replies: Mapping[int, tuple[np.ndarray, Mapping[str, Any]]]
    ) -> dict[int, dict[str, Any]]:
        """Masked vectors in (summed at once, never kept); unmask requests out."""
        self._advance(m.UNMASK)
        self._refuse_unexpected(replies, stage=m.MASKED_INPUT)
        for nid in sorted(replies):
            self.add_masked_vector(nid, replies[nid])
        return self.masked_vectors_done()

    def add_masked_vector(self, nid: int, reply: tuple[np.ndarray, Mapping[str, Any]]) -> None:
        """One site's masked vector, added to the running sum as it arrives, so the coordinator holds one vector at
        a time however many sites there are. A malformed one loses its site; `masked_vectors_done` ends the stage."""
        self._advance(m.UNMASK)
        if nid not in self._expected or nid in self._masked or nid in self._dropped:
            self._next = _FAILED
            raise SecAggProtocolError(
                f"SecAgg round {self.round_id}: a {m.MASKED_INPUT} reply from node {nid}, which was not sent a message "
                "at this stage or replied already; the transport must pass each of this stage's replies once"
            )
        try:
            vector = read_masked_vector(
                reply, round_id=self.round_id, length=self.layout.length, dtype=self.layout.dtype
            )
        except SecAggProtocolError as exc:
            self._lose(nid, m.MASKED_INPUT, f"malformed reply: {exc}")
            return
        if self._sum is None:
            self._sum = np.zeros(self.layout.length, dtype=self.layout.dtype)
        self._sum += vector  # wraps modulo 2^b by design
        self._masked.add(nid)

    def masked_vectors_done(self) -> dict[int, dict[str, Any]]:
        """The stage's end: the sites whose vector did not arrive are lost; unmask requests out."""
        self._advance(m.UNMASK)
        for nid in sorted(self._expected - self._masked - set(self._dropped)):
            self._lose(nid, m.MASKED_INPUT, "no reply")
        masked = set(self._masked)
        # Every secret (seeds of the masked, mask keys of the dropped) needs threshold live holders.
        self._require_coverage(
            self._shared, owners=masked, stage=m.MASKED_INPUT, what="masked-input survivors holding its shares"
        )
        if self._sum is None:
            self._sum = np.zeros(self.layout.length, dtype=self.layout.dtype)
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

        answers = self._collect(
            replies,
            stage=m.UNMASK,
            parse=lambda nid, reply: read_unmask_shares(
                reply, round_id=self.round_id, requested=self._unmask_requests[nid]
            ),
        )
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
            self._fail(m.UNMASK, f"too few shares arrived to rebuild the masks ({detail})", fix=self._survivor_fix())

        assert self._sum is not None
        total = self._sum
        remove_masks(
            total,
            seed_shares=seed_shares,
            key_shares=key_shares,
            threshold=self.threshold,
            round_id=self.round_id,
            length=self.layout.length,
            commitments=self._commitments,
            pk1=self._pk1,
            nbrs=self._nbrs,
            masked=self._masked,
            fail=self._fail,
        )
        self._sum = None
        result = decode_result(
            total,
            layout=self.layout,
            settings=self.settings,
            shapes=self._shapes,
            sites_aggregated=sorted(self._masked),
            sites_dropped=dict(self._dropped),
            sites_silent_at_unmask=list(self._silent_at_unmask),
            fail=self._fail,
        )
        self._next = _FINISHED
        logger.info(
            "SecAgg round %s: aggregated %d sites (total weight %d), dropped %s",
            self.round_id,
            len(self._masked),
            result.total_weight,
            self._dropped or "none",
        )
        if result.clipped_values:
            logger.warning(
                "SecAgg round %s: %d update values were clipped to +-%g across sites; raise "
                "clipping_range if this recurs",
                self.round_id,
                result.clipped_values,
                self.settings.clipping_range,
            )
        return result

    # ------------------------------------------------------------------ helpers
    def _advance(self, stage: str) -> None:
        if self._next != stage:
            if self._next in (_FAILED, _FINISHED):
                raise SecAggProtocolError(
                    f"SecAgg round {self.round_id} is {self._next}; start a new round with a new SecAggServer"
                )
            raise SecAggProtocolError(
                f"SecAgg round {self.round_id}: called the '{stage}' step out of order; call "
                f"{_NEXT_CALL[self._next]}() next"
            )

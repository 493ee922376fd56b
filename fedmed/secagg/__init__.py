"""SecAgg+ secure aggregation of weighted model updates: the transport-free protocol core.

Flower's SecAgg+ protocol (stages, Shamir-shared secrets, pairwise and self masks, dropout recovery)
carried onto plain-data state machines, built on Flower's own primitives
(`flwr.common.secure_aggregation`: ECDH shared keys + HKDF, Fernet, Shamir shares, share plaintexts).
The transport (Flower messages, timeouts) lives elsewhere and only moves the dicts/arrays below.
One deliberate departure: mask streams come from AES-256-CTR keyed through HKDF
(`fedmed.secagg.masking`), not Flower's `pseudo_rand_gen`, whose seed is folded to 32 bits.

Imports only fedmed.core; Flower's primitives come in through `fedmed.secagg.primitives` alone.

API
---
    SecAggSettings(clipping_range: float = 0.5, max_total_weight: int = 2**16,
                   reconstruction_threshold: int | None = None, num_shares: int | None = None,
                   stage_timeout_s: float = 120.0)                   # frozen, validated
        .levels -> int                    # L
        .max_quantization_error -> float  # per-element bound, see below

    server = SecAggServer(*, node_ids: Sequence[int], shapes: Sequence[Sequence[int]],
                          settings: SecAggSettings | None = None, extra_length: int = 0,
                          round_id: str | None = None, shuffle_seed: int | None = None)
        .setup_messages() -> dict[int, dict]                                        # stage 0 out
        .receive_public_keys(replies: Mapping[int, Mapping]) -> dict[int, dict]     # -> share-keys msgs
        .receive_encrypted_shares(replies: Mapping[int, Mapping]) -> dict[int, dict]  # -> masked-input msgs
        .receive_masked_vectors(replies: Mapping[int, tuple[np.ndarray, Mapping]]) -> dict[int, dict]
                                                                                    # -> unmask msgs
        .receive_unmask_shares(replies: Mapping[int, Mapping]) -> SecAggResult
        .round_id, .threshold, .vector_length, .neighbourhoods, .active_nodes, .sites_dropped

    client = SecAggClient(*, node_id: int)            # or SecAggClient.from_record(record, node_id=...)
        .setup(message) -> dict
        .share_keys(message) -> dict
        .mask(message, *, update: Sequence[np.ndarray], weight: int,
              extra_counts: Sequence[int] | None = None) -> tuple[np.ndarray (uint32), dict]
        .unmask(message) -> dict
        .state_to_record() -> dict[str, int | float | str | bytes | list[int] | list[bytes]]
        .stage, .last_clipped_values

    SecAggResult(mean_update: list[np.ndarray float32], total_weight: int,
                 extra_sums: np.ndarray int64 | None, sites_aggregated: list[int],
                 sites_dropped: dict[int, str], max_quantization_error: float,
                 clipped_values: int, sites_silent_at_unmask: list[int])

    Errors (all FedmedError): SecAggRoundError (round cannot complete; .stage, .lost),
    SecAggProtocolError (a message breaks the protocol; the receiver refuses it),
    SecAggInputError (bad local input or settings; also a ValueError).

Transport contract: every message/reply is a flat dict of int, float, str, bytes, list[int] and
list[bytes] (fits a ConfigRecord); the masked vector is one 1-D uint32 array of length
`server.vector_length` (fits an ArrayRecord). Pass each stage's replies as {node_id: reply}; omit
nodes that timed out or failed. A node id may be anything in [0, 2^64) (Flower's are < 2^63).

Quantisation (weighted mean of updates, uint32 on the wire)
-----------------------------------------------------------
    L = largest even integer <= (2^32 - 1) / max_total_weight     (65534 for 2^16)
    q_i = rint((clip(delta_i, -R, R) + R) * L / (2R))              in [0, L]
    site i sends  [w_i * q_i, w_i, clipped_i, extra_i] + masks     (mod 2^32)
    server gets   S = sum w_i q_i,  W = sum w_i  (never an individual w_i)
    mean = (S / W) * (2R / L) - R                                  as float32
    |mean - exact weighted mean of the clipped updates| <= R / L + R * 2^-23  (= 7.7e-6 for R = 0.5)
S cannot wrap because sum w_i <= max_total_weight (checked after unmasking; a site's own
weight above it is refused at once). The vector is num_params + 2 + extra_length uint32 values:
~1.0x the float32 model size per site per round.

Dropouts: see `fedmed.secagg.server` (excluded at setup/share-keys, masks removed via Shamir
shares at masked-input, tolerated at unmask while every secret keeps `threshold` shares).
"""

from fedmed.secagg.client import SecAggClient
from fedmed.secagg.errors import SecAggError, SecAggInputError, SecAggProtocolError, SecAggRoundError
from fedmed.secagg.server import SecAggResult, SecAggServer
from fedmed.secagg.settings import SecAggSettings

__all__ = [
    "SecAggClient",
    "SecAggError",
    "SecAggInputError",
    "SecAggProtocolError",
    "SecAggResult",
    "SecAggRoundError",
    "SecAggServer",
    "SecAggSettings",
]

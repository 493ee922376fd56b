"""Mask generation: keys from Flower's primitives, mask streams from AES-256-CTR.

Key agreement, encryption and secret sharing are Flower's (`flwr.common.secure_aggregation`,
`flwr.supercore.primitives.asymmetric`). The mask stream is the one place we do not use Flower's
`pseudo_rand_gen`: it folds the seed into a 32-bit RandomState seed, so a server could brute-force a
mask in 2^32 tries, and it draws int64 values. Here HKDF-SHA256 turns the secret into an AES-256 key
and the AES-CTR keystream is the mask: a standard cryptographic PRG from `cryptography`, ~0.5 ms per
1M uint32 values. Every key is fresh per round, so the fixed all-zero counter block never repeats.
"""

from __future__ import annotations

import hashlib

import numpy as np
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedmed.secagg.errors import SecAggProtocolError
from fedmed.secagg.primitives import bytes_to_private_key, bytes_to_public_key, generate_shared_key, public_key_to_bytes

_SELF_MASK = b"fedmed-secagg/v1/self-mask/"
_PAIR_MASK = b"fedmed-secagg/v1/pairwise-mask/"
_SEED_COMMITMENT = b"fedmed-secagg/v1/seed-commitment/"
SEED_BYTES = 32


def _stream_key(secret: bytes, *, label: bytes, round_id: str) -> bytes:
    # Domain separation: the same secret never keys two different masks (self vs pairwise, rounds).
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label + round_id.encode()).derive(secret)


def mask_stream(key: bytes, length: int, *, dtype: type[np.unsignedinteger] = np.uint32) -> np.ndarray:
    """`length` pseudo-random field elements (uint32 or uint16): the AES-256-CTR keystream under `key`, uniform
    over the field because each element takes exactly its width of keystream bytes."""
    width = np.dtype(dtype).itemsize
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    keystream = encryptor.update(bytes(width * length)) + encryptor.finalize()
    return np.frombuffer(keystream, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype, copy=False)


def self_mask(seed: bytes, *, round_id: str, length: int, dtype: type[np.unsignedinteger] = np.uint32) -> np.ndarray:
    """The private mask b_u a site adds to its own vector (removed with its reconstructed seed)."""
    return mask_stream(_stream_key(seed, label=_SELF_MASK, round_id=round_id), length, dtype=dtype)


def pairwise_mask(
    own_sk1: bytes, peer_pk1: bytes, *, round_id: str, length: int, dtype: type[np.unsignedinteger] = np.uint32
) -> np.ndarray:
    """The mask s_uv shared by two sites, from ECDH(sk1_u, pk1_v) == ECDH(sk1_v, pk1_u)."""
    shared = generate_shared_key(bytes_to_private_key(own_sk1), bytes_to_public_key(peer_pk1))
    return mask_stream(_stream_key(shared, label=_PAIR_MASK, round_id=round_id), length, dtype=dtype)


def apply_pairwise(vector: np.ndarray, mask: np.ndarray, *, adder: int, other: int, sign: int = 1) -> None:
    """In place: the site with the larger id adds s_uv, the smaller subtracts it, so the pair cancels.

    sign=-1 undoes the contribution `adder` made (the server's correction for a dropped `other`).
    """
    if (adder > other) == (sign > 0):
        vector += mask
    else:
        vector -= mask


def check_public_key(pem: bytes) -> None:
    """Refuse anything but a PEM EC public key (Flower's ECDH works on EC keys only)."""
    try:
        key = bytes_to_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise SecAggProtocolError(
            "SecAgg: a public key is not a PEM-encoded EC public key; the sender does not "
            "run fedmed's SecAgg or the key was altered in transit"
        )


def seed_commitment(seed: bytes, *, round_id: str) -> bytes:
    """SHA-256 binding of the self-mask seed; lets the server detect a corrupt reconstruction."""
    return hashlib.sha256(_SEED_COMMITMENT + round_id.encode() + b"/" + seed).digest()


def public_key_of(private_key_pem: bytes) -> bytes:
    """PEM public key of a PEM private key: checks a reconstructed sk1 against the published pk1."""
    return public_key_to_bytes(bytes_to_private_key(private_key_pem).public_key())

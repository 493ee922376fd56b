"""Flower's SecAgg+ primitives, the protocol's only flwr import: EC key pairs and ECDH shared keys,
Fernet encryption of the key shares, Shamir secret sharing and the share-plaintext format."""

from __future__ import annotations

from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_concat, share_keys_plaintext_separate
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

__all__ = [
    "bytes_to_private_key",
    "bytes_to_public_key",
    "combine_shares",
    "create_shares",
    "decrypt",
    "encrypt",
    "generate_key_pairs",
    "generate_shared_key",
    "private_key_to_bytes",
    "public_key_to_bytes",
    "share_keys_plaintext_concat",
    "share_keys_plaintext_separate",
]

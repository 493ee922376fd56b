"""Compressed updates: a site encodes its update (local - global) in fewer bytes, the coordinator decodes it
([compression]; the site's error feedback is fedmed.site.compression). Pure numpy: no flwr, no torch."""

from .codec import CompressionError, UpdateCodec
from .update import decode_groups, encode_groups, group_parts, part_key

__all__ = ["CompressionError", "UpdateCodec", "decode_groups", "encode_groups", "group_parts", "part_key"]

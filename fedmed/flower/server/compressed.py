"""[compression], the coordinator's part: every compressed reply is decoded into the round's global arrays plus the
site's update before anything else reads it, so the reply checks, the robust layer and the strategy see ordinary
weights, as from an uncompressed site. A reply that does not decode is refused for its site alone, with the reason."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from fedmed.compression import CompressionError, UpdateCodec, decode_groups
from fedmed.config import CompressionConfig
from fedmed.flower.records import sender
from fedmed.flower.wire import ARRAYS, COMPRESSED


def decode_replies(
    replies: list[Message], *, start: dict[str, np.ndarray], settings: CompressionConfig
) -> tuple[list[Message], dict[str, str]]:
    """The replies with their updates decoded into ARRAYS, and the refused ones' reasons by site. `start`: the round's
    global arrays."""
    codec = UpdateCodec.of(settings)
    passed, refused = [], {}
    for reply in replies:
        if COMPRESSED in reply.content:
            try:
                reply.content[ARRAYS] = _decoded(reply.content[COMPRESSED], start=start, codec=codec)
            except CompressionError as error:
                site = sender(reply)
                refused[site] = f"site {site}: reply refused by the coordinator: {error}"
                continue
            del reply.content[COMPRESSED]
        passed.append(reply)
    return passed, refused


def _decoded(record: ArrayRecord, *, start: dict[str, np.ndarray], codec: UpdateCodec) -> ArrayRecord:
    floats = {key: array for key, array in start.items() if np.issubdtype(array.dtype, np.floating)}
    raw = {key: record[key].numpy() for key in start if key not in floats and key in record}
    missing = sorted(set(start) - set(floats) - set(raw))
    if missing:
        raise CompressionError(f"the encoded update lacks the parameter group(s) {missing}; it runs another model")
    for key, values in raw.items():
        if values.shape != start[key].shape or values.dtype != start[key].dtype:
            raise CompressionError(
                f"parameter group '{key}' has shape {values.shape} {values.dtype}, expected "
                f"{start[key].shape} {start[key].dtype}; it runs another model"
            )
    parts = {key: array.numpy() for key, array in record.items() if key not in raw}
    updates = decode_groups(codec, parts, sizes={key: array.size for key, array in floats.items()})
    arrays = {key: Array(np.add(array, updates[key], dtype=array.dtype)) for key, array in floats.items()}
    return ArrayRecord({key: arrays[key] if key in arrays else Array(raw[key]) for key in start})

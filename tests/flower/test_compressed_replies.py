"""The coordinator decodes each compressed reply into global + update before anything reads it, and refuses, for that
site alone and with the reason, one that does not decode."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedmed.compression import UpdateCodec, encode_groups
from fedmed.config import CompressionConfig
from fedmed.flower.server.compressed import decode_replies
from fedmed.flower.wire import ARRAYS, COMPRESSED, METRICS, SITE, SITE_NAME

pytestmark = pytest.mark.usefixtures("server_task")

SETTINGS = CompressionConfig(bits=8, top_k=0.5, chunk=16)
START = {"float32": np.linspace(-1, 1, 40, dtype=np.float32), "int64": np.array([7], dtype=np.int64)}


def _reply(site: str, parts: dict[str, np.ndarray]) -> Message:
    content = RecordDict(
        {
            COMPRESSED: ArrayRecord({key: Array(value) for key, value in parts.items()}),
            METRICS: MetricRecord({"num-examples": 4}),
            SITE: ConfigRecord({SITE_NAME: site}),
        }
    )
    return Message(content, reply_to=Message(RecordDict(), dst_node_id=1, message_type="train"))


def test_replies_become_global_plus_update_and_a_bad_one_is_refused_alone() -> None:
    codec = UpdateCodec.of(SETTINGS)
    update = np.random.default_rng(0).standard_normal(40).astype(np.float32)
    parts = encode_groups(codec, {"float32": update}, rng=np.random.default_rng(1)) | {"int64": np.array([8])}
    tampered = {**parts, "float32.indices": parts["float32.indices"][::-1].copy()}
    passed, refused = decode_replies(
        [_reply("site-a", parts), _reply("site-b", tampered)], start=START, settings=SETTINGS
    )

    assert [message.content[SITE][SITE_NAME] for message in passed] == ["site-a"]
    arrays = passed[0].content[ARRAYS]
    assert COMPRESSED not in passed[0].content and list(arrays.keys()) == ["float32", "int64"]
    decoded = codec.decode({k.split(".")[1]: v for k, v in parts.items() if k.startswith("float32.")}, size=40)
    np.testing.assert_array_equal(arrays["float32"].numpy(), START["float32"] + decoded)
    assert arrays["int64"].numpy().tolist() == [8]  # counters travel as they are
    assert refused == {
        "site-b": "site site-b: reply refused by the coordinator: the encoded update's indices are "
        "not distinct, ascending and below 40"
    }

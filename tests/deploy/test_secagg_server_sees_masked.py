"""What a deployed coordinator receives under SecAgg+, captured at the coordinator: every message a site
sends lands in the SuperLink's object store (server/state/superlink.db) before the ServerApp pulls it.
A trigger added to that database for the length of one run copies each stored object aside; the
test then rebuilds the sites' messages with Flower's own inflation and reads every array in them.

Under SecAgg+ the only arrays a site sends are masked uint32 vectors, uniform over the field; in a
plain run the same capture finds the sites' float32 updates, so the capture sees what it looks for.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator

import numpy as np
import pytest
from deploy_helpers import run_config
from flwr.app import ArrayRecord, Message
from flwr.supercore.inflatable.inflatable_object import get_object_type_from_object_content
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

from fedmed.config import load_server_config
from fedmed.deploy.local import LocalFederation
from fedmed.deploy.server import site_nodes_file

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CAPTURE = "fedmed_test_received"
FIELD = 2**32  # SecAgg+ works in uint32 arithmetic


@contextlib.contextmanager
def objects_the_superlink_stores(federation: LocalFederation) -> Iterator[dict[str, bytes]]:
    """Object id -> content of every object stored while the block runs; the database is left as found."""
    database = load_server_config(federation.server_config).superlink.database
    captured: dict[str, bytes] = {}
    with contextlib.closing(sqlite3.connect(database, timeout=60)) as connection:
        connection.executescript(
            f"""
            CREATE TABLE {CAPTURE} (object_id TEXT, content BLOB);
            CREATE TRIGGER {CAPTURE}_trigger AFTER UPDATE OF content ON objects WHEN NEW.is_available = 1
            BEGIN INSERT INTO {CAPTURE} VALUES (NEW.object_id, NEW.content); END;
            """
        )
        try:
            yield captured
            captured.update(connection.execute(f"SELECT object_id, content FROM {CAPTURE}").fetchall())
        finally:
            connection.executescript(f"DROP TRIGGER {CAPTURE}_trigger; DROP TABLE {CAPTURE};")


def _site_messages(federation: LocalFederation, objects: dict[str, bytes]) -> list[tuple[str, Message]]:
    """(site, message) for every message a site sent, rebuilt from the stored objects."""
    nodes = json.loads(site_nodes_file(load_server_config(federation.server_config)).read_text())
    site_of = {int(node): site for site, node in nodes.items()}
    messages = []
    for object_id, content in objects.items():
        if get_object_type_from_object_content(content) != "Message":
            continue
        message = inflate_object_from_contents(object_id, objects, keep_object_contents=True)
        assert isinstance(message, Message)
        if message.metadata.src_node_id in site_of:
            messages.append((site_of[message.metadata.src_node_id], message))
    return messages


def _arrays(message: Message) -> list[tuple[str, np.ndarray]]:
    if message.has_error():
        return []
    return [
        (f"{key}/{name}", array.numpy())
        for key, record in message.content.items()
        if isinstance(record, ArrayRecord)
        for name, array in record.items()
    ]


def _captured_run(federation: LocalFederation, name: str, **sections: dict) -> list[tuple[str, Message]]:
    config = run_config(
        federation, name, train={"rounds": 1}, evaluation={"cross_site": False}, dp_sgd={"enabled": False}, **sections
    )
    with objects_the_superlink_stores(federation) as objects:
        federation.run(config, "--wait")
    messages = _site_messages(federation, objects)
    assert {site for site, _ in messages} == set(federation.sites), "the capture missed a site"
    return messages


def _looks_uniform(vector: np.ndarray) -> bool:
    """A chi-square test of 16 equal bins over the field, at a false alarm rate of about 1e-6."""
    counts = np.bincount((vector.astype(np.uint64) * 16 // FIELD).astype(np.int64), minlength=16)
    expected = vector.size / 16
    return float(((counts - expected) ** 2 / expected).sum()) < 53.0  # chi2(15 dof) quantile 1 - 1e-6


def test_under_secagg_the_coordinator_receives_only_masked_vectors(federation: LocalFederation) -> None:
    plain = _captured_run(federation, "plain-capture")
    updates = [
        (site, array)
        for site, message in plain
        for _, array in _arrays(message)
        if message.metadata.message_type == "train"
    ]
    # The control: without SecAgg+ the coordinator does receive each site's float update.
    assert {site for site, _ in updates} == set(federation.sites)
    assert all(array.dtype == np.float32 for _, array in updates)
    update_size = max(array.size for _, array in updates)

    secure = _captured_run(federation, "secagg-capture", secagg={"enabled": True})
    kinds = {message.metadata.message_type for _, message in secure}
    assert {"train.secagg_setup", "train.secagg_share", "train.secagg_mask", "train.secagg_unmask"} <= kinds
    arrays = [
        (site, message.metadata.message_type, key, array) for site, message in secure for key, array in _arrays(message)
    ]
    strays = [
        (site, kind, key, str(array.dtype), array.shape)
        for site, kind, key, array in arrays
        if kind != "train.secagg_mask" or array.dtype != np.uint32
    ]
    assert not strays, f"arrays other than masked vectors reached the coordinator: {strays}"
    masked = {site: array for site, _, _, array in arrays}
    assert set(masked) == set(federation.sites) and len(arrays) == len(federation.sites)
    for site, vector in masked.items():
        assert vector.ndim == 1 and vector.size >= update_size, (site, vector.shape, update_size)
        assert _looks_uniform(vector), f"site {site}'s masked vector is not uniform over the field"
    # The plain updates, quantized as SecAgg+ would, are far from uniform: the test tells the two apart.
    for _, update in updates:
        scaled = (np.clip(update.astype(np.float64), -0.5, 0.5) + 0.5) * (FIELD - 1)
        assert not _looks_uniform(scaled.astype(np.uint64).ravel())

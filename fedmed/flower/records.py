"""How fedmed's content becomes Flower records and back: packed parameters, the run's UserConfig,
sites' intensity summaries and reply sender names. The keys are in fedmed.flower.wire.

Parameters travel packed: one flat array per dtype instead of one array per tensor. Flower 1.41
moves every array of a message as a separate object (its own request between SuperLink, SuperNode
and ClientApp), so a UNet's ~30 tensors cost ~30 round trips per message and a ResNet's hundreds;
one flat vector costs one. Flower's strategies aggregate the flat vectors element-wise exactly as
they would the tensors. Both sides derive the layout (keys, shapes, dtypes) from the model the run
config describes, and a digest of it travels with every message to catch mismatched models.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict, UserConfig
from flwr.common.serde import recorddict_to_proto

from fedmed.config import RunConfig, run_config_from_dict
from fedmed.core.errors import FedmedError

from .wire import RUN_CONFIG_KEY, RUN_DIR_KEY, RUN_ID_KEY, SITE, SITE_NAME, SITE_NODES_KEY, SUBMISSION_KEY


def encode_run(
    config: RunConfig,
    *,
    run_id: str,
    run_dir: Path | None = None,
    submission: str | None = None,
    site_nodes: dict[int, str] | None = None,
) -> UserConfig:
    """The run as Flower UserConfig: the resolved config travels as one JSON string.

    Exactly one of `run_dir` (a simulation, in this process) and `submission` (a deployed run: a token
    the coordinator exchanges for the directory, fedmed.runs.submissions) says where the run writes.
    """
    if (run_dir is None) == (submission is None):
        raise FedmedError("encode_run needs exactly one of run_dir (simulation) and submission (deployment)")
    where = {RUN_DIR_KEY: str(run_dir)} if run_dir is not None else {SUBMISSION_KEY: submission}
    return {
        RUN_CONFIG_KEY: config.model_dump_json(),
        **where,
        RUN_ID_KEY: run_id,
        SITE_NODES_KEY: json.dumps({str(node): site for node, site in (site_nodes or {}).items()}),
    }


def decode_site_nodes(run_config: UserConfig) -> dict[int, str]:
    return {int(node): site for node, site in json.loads(str(run_config.get(SITE_NODES_KEY, "{}"))).items()}


def decode_config(run_config: UserConfig) -> RunConfig:
    return _decode(str(run_config[RUN_CONFIG_KEY]))


@lru_cache(maxsize=4)
def _decode(text: str) -> RunConfig:
    # Paths were resolved before encoding; base only matters for relative ones.
    return run_config_from_dict(json.loads(text), base=Path.cwd(), source=RUN_CONFIG_KEY)


class LayoutMismatchError(FedmedError):
    """Packed parameters do not fit the model this side built from the run config."""


@dataclass(frozen=True)
class Layout:
    """The state-dict entries that travel, in order, with their shapes and dtypes."""

    entries: tuple[tuple[str, tuple[int, ...], str], ...]

    @classmethod
    def of(cls, state: dict[str, torch.Tensor], keys: Iterable[str]) -> Layout:
        return cls(tuple((key, tuple(state[key].shape), str(state[key].dtype).removeprefix("torch.")) for key in keys))

    @property
    def keys(self) -> list[str]:
        return [key for key, _, _ in self.entries]

    @property
    def digest(self) -> str:
        return hashlib.sha256(repr(self.entries).encode()).hexdigest()[:16]

    def pack(self, state: dict[str, torch.Tensor]) -> ArrayRecord:
        groups: dict[str, list[torch.Tensor]] = {}
        for key, _, dtype in self.entries:
            groups.setdefault(dtype, []).append(state[key].detach().reshape(-1).cpu())
        return ArrayRecord({dtype: _to_array(torch.cat(parts).numpy()) for dtype, parts in groups.items()})

    def unpack(self, record: ArrayRecord) -> dict[str, torch.Tensor]:
        flats = {dtype: torch.from_numpy(_to_numpy(array)) for dtype, array in record.items()}
        expected = {
            dtype: sum(math.prod(shape) for _, shape, kind in self.entries if kind == dtype)
            for _, _, dtype in self.entries
        }
        received = {dtype: flat.numel() for dtype, flat in flats.items()}
        if received != expected:
            raise LayoutMismatchError(
                f"received parameters {received} do not fit this model's {expected}: coordinator and site must "
                f"build the same model (same fedmed version and task/model config)"
            )
        state, offsets = {}, dict.fromkeys(flats, 0)
        for key, shape, dtype in self.entries:
            size = math.prod(shape)
            state[key] = flats[dtype][offsets[dtype] : offsets[dtype] + size].reshape(shape)
            offsets[dtype] += size
        return state


def _to_array(values: np.ndarray) -> Array:
    """Encode one array exactly as Flower does (.npy bytes), reusing the header for a known dtype/shape."""
    if not values.flags.c_contiguous:
        values = values.copy(order="C")
    key = (values.dtype.str, values.shape)
    header = _NPY_HEADERS.get(key)
    if header is None:
        encoded = Array(values)
        _NPY_HEADERS[key] = encoded.data[: len(encoded.data) - values.nbytes]
        return encoded
    return Array(
        dtype=str(values.dtype), shape=tuple(values.shape), stype="numpy.ndarray", data=header + values.tobytes()
    )


_NPY_HEADERS: dict[tuple[str, tuple[int, ...]], bytes] = {}


def _to_numpy(array: Array) -> np.ndarray:
    """Decode one array; a writable copy.

    Flower stores arrays in .npy format and `Array.numpy()` parses each header with
    `ast.literal_eval`, which dominates for small tensors. A C-ordered payload in the expected dtype
    is simply the last bytes of the buffer; anything else takes Flower's decoder.
    """
    if array.stype == "numpy.ndarray":
        dtype = np.dtype(array.dtype)
        count = math.prod(array.shape)
        offset = len(array.data) - count * dtype.itemsize
        header = array.data[: max(offset, 0)]
        if (
            offset > 0
            and header.startswith(b"\x93NUMPY")
            and b"'fortran_order': False" in header
            and f"'descr': '{dtype.str}'".encode() in header
        ):
            return np.frombuffer(array.data, dtype=dtype, count=count, offset=offset).reshape(array.shape).copy()
    return array.numpy()


def site_record(name: str) -> ConfigRecord:
    """The record naming the site that sends a reply."""
    return ConfigRecord({SITE_NAME: name})


def sender(reply: Message) -> str:
    """The name of the site that sent `reply`."""
    return str(reply.content[SITE][SITE_NAME])


def encode_summary(summary: dict[str, Any]) -> ConfigRecord:
    """A site's intensity summaries, histograms as flat fields: ConfigRecord holds scalars and flat lists only."""
    record: dict[str, Any] = {}
    for key, value in summary.items():
        if isinstance(value, dict):  # a histogram
            record[f"{key}-counts"] = [int(count) for count in value["counts"]]
            record[f"{key}-range"] = [float(value["low"]), float(value["high"])]
        elif isinstance(value, list):
            record[key] = [float(item) for item in value]
        else:
            record[key] = value
    return ConfigRecord(record)


def decode_summary(record: ConfigRecord) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for key, value in record.items():
        if key.endswith("-counts"):
            name = key.removesuffix("-counts")
            low, high = record[f"{name}-range"]
            summary[name] = {"counts": list(value), "low": float(low), "high": float(high)}
        elif not key.endswith("-range"):
            summary[key] = list(value) if isinstance(value, list) else value
    return summary


def wire_bytes(content: RecordDict) -> int:
    """Bytes of a message's content as Flower serializes it to send it (its RecordDict protobuf): what crossed the
    wire, less gRPC's and TLS's framing. The site's audit log records the same count for the same reply."""
    return recorddict_to_proto(content).ByteSize()

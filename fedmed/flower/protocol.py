"""What travels between ServerApp and ClientApp: record keys and the run's UserConfig entries."""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, UserConfig

from fedmed.config import RunConfig, run_config_from_dict

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"

RUN_CONFIG_KEY = "fedmed-config"
RUN_DIR_KEY = "fedmed-run-dir"
RUN_ID_KEY = "fedmed-run-id"
SITE_NODES_KEY = "fedmed-site-nodes"  # deployment: {node id: site name}, so messages can name silent sites


def encode_run(config: RunConfig, *, run_dir: Path, run_id: str, site_nodes: dict[int, str] | None = None
               ) -> UserConfig:
    """The run as Flower UserConfig: the resolved config travels as one JSON string."""
    return {
        RUN_CONFIG_KEY: config.model_dump_json(),
        RUN_DIR_KEY: str(run_dir),
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


def to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({key: _to_array(value.detach().cpu().numpy()) for key, value in state.items()})


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
    return Array(dtype=str(values.dtype), shape=tuple(values.shape), stype="numpy.ndarray",
                 data=header + values.tobytes())


_NPY_HEADERS: dict[tuple[str, tuple[int, ...]], bytes] = {}


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(_to_numpy(array)) for key, array in record.items()}


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

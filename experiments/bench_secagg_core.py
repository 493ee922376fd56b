"""Crypto and masking overhead of fedmed's SecAgg+ core, without Flower or a network.

For a 1M-parameter float32 update and 3 or 5 sites, times each client stage (median over sites)
and the server's sum and unmask steps, with no dropout and with one site lost at masked-input
(the server must then rebuild its mask key and regenerate its pairwise masks). Also compares the
mask generator (AES-256-CTR) with Flower's `pseudo_rand_gen` on the same 1M values.

    python experiments/bench_secagg_core.py [--params 1000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

from fedmed.api.bench import SecAggClient, SecAggServer, SecAggSettings, mask_stream


def _timed(call: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = call()
    return out, (time.perf_counter() - start) * 1e3


def one_round(num_sites: int, num_params: int, *, drop_at_mask: bool, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    ids = [1000 + i for i in range(num_sites)]
    shapes = [(num_params,)]
    updates = {nid: [rng.uniform(-0.4, 0.4, num_params).astype(np.float32)] for nid in ids}
    weights = {nid: 100 + 10 * i for i, nid in enumerate(ids)}
    lost = ids[-1] if drop_at_mask else None
    server = SecAggServer(node_ids=ids, shapes=shapes, settings=SecAggSettings())
    clients = {nid: SecAggClient(node_id=nid) for nid in ids}
    times: dict[str, list[float]] = {"setup": [], "share": [], "mask": [], "unmask": []}

    def run_clients(name: str, messages: dict[int, dict[str, Any]], call: Callable[..., Any]) -> dict[int, Any]:
        replies = {}
        for nid, message in messages.items():
            reply, ms = _timed(lambda nid=nid, message=message: call(clients[nid], message))
            times[name].append(ms)
            replies[nid] = reply
        return replies

    start = time.perf_counter()
    messages = server.setup_messages()
    messages = server.receive_public_keys(run_clients("setup", messages, lambda c, m: c.setup(m)))
    messages = server.receive_encrypted_shares(run_clients("share", messages, lambda c, m: c.share_keys(m)))
    replies = run_clients(
        "mask", messages, lambda c, m: c.mask(m, update=updates[c.node_id], weight=weights[c.node_id])
    )
    if lost is not None:
        replies.pop(lost)
    messages, sum_ms = _timed(lambda: server.receive_masked_vectors(replies))
    replies = run_clients("unmask", messages, lambda c, m: c.unmask(m))
    result, unmask_ms = _timed(lambda: server.receive_unmask_shares(replies))
    total_s = time.perf_counter() - start
    survivors = [nid for nid in ids if nid != lost]
    exact = sum(weights[n] * updates[n][0].astype(np.float64) for n in survivors) / sum(weights[n] for n in survivors)
    error = float(np.abs(result.mean_update[0] - exact).max())
    assert error <= result.max_quantization_error, (error, result.max_quantization_error)
    return {
        "client_setup_ms": statistics.median(times["setup"]),
        "client_share_ms": statistics.median(times["share"]),
        "client_mask_ms": statistics.median(times["mask"]),
        "client_unmask_ms": statistics.median(times["unmask"]),
        "server_sum_ms": sum_ms,
        "server_unmask_ms": unmask_ms,
        "round_s": total_s,
        "error": error,
        "bound": result.max_quantization_error,
        "wire_ratio": server.vector_length * 4 / (num_params * 4),
    }


def prg_comparison(num_params: int, repeats: int) -> tuple[float, float]:
    key = os.urandom(32)
    aes = min(_timed(lambda: mask_stream(key, num_params))[1] for _ in range(repeats))
    flower = min(_timed(lambda: pseudo_rand_gen(key, 2**32, [(num_params,)]))[1] for _ in range(repeats))
    return aes, flower


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("fedmed").setLevel(logging.ERROR)  # the dropout runs would warn on every round

    print(
        f"SecAgg+ core, {args.params:,} float32 parameters, median of {args.repeats} rounds, {os.cpu_count()} CPU cores"
    )
    header = (
        f"{'sites':>5} {'dropped':>8} | {'setup':>6} {'share':>6} {'mask':>6} {'unmask':>6} | "
        f"{'sum':>6} {'unmask':>7} | {'round s':>7} {'wire x':>6} {'max err':>9} {'bound':>9}"
    )
    print(f"{'':>14} | {'client ms (median site)':^27} | {'server ms':^14} |")
    print(header)
    print("-" * len(header))
    for num_sites in (3, 5):
        for drop in (False, True):
            runs = [one_round(num_sites, args.params, drop_at_mask=drop, seed=r) for r in range(args.repeats)]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            print(
                f"{num_sites:>5} {('1 @mask' if drop else 'none'):>8} | {med['client_setup_ms']:6.1f} "
                f"{med['client_share_ms']:6.1f} {med['client_mask_ms']:6.1f} {med['client_unmask_ms']:6.1f} | "
                f"{med['server_sum_ms']:6.1f} {med['server_unmask_ms']:7.1f} | {med['round_s']:7.2f} "
                f"{med['wire_ratio']:6.3f} {max(r['error'] for r in runs):9.2e} {med['bound']:9.2e}"
            )
    aes, flower = prg_comparison(args.params, max(args.repeats, 3))
    print(
        f"\nmask generator for {args.params:,} uint32 values: AES-256-CTR {aes:.1f} ms "
        f"(used), Flower pseudo_rand_gen {flower:.1f} ms (32-bit seed, not used)"
    )


if __name__ == "__main__":
    main()

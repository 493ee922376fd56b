"""Framework overhead: fedmed's engines against a plain PyTorch loop doing the same work.

The plain loop trains and evaluates the same sites, rounds, epochs and seeds with the same
training function, averaging in the same order, so both produce bit-identical models (checked);
the difference in wall time is what fedmed and Flower add: messages, records, the run directory,
checkpoints and metrics. Data is loaded once before timing for both. The script exits with code 1
when the models of any pair differ (the ratio would then compare different work).

    python experiments/bench_overhead.py [--repeats 3] [--ray]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from fedmed.api import (
    RunConfig,
    build_model,
    demo_config_file,
    get_task,
    load_config,
    materialize_sites,
    set_flower_verbosity,
    site_data,
)
from fedmed.api.bench import run_engine, select_device, site_seed, train_local


def demo_config(output_dir: Path) -> RunConfig:
    config = load_config(demo_config_file())
    config.output_dir = output_dir
    config.baselines.local_only = config.baselines.pooled = False
    config.evaluation.cross_site = False  # extra work the plain loop does not do: not overhead
    return materialize_sites(config)


def plain_loop(config: RunConfig, sites: dict) -> dict[str, torch.Tensor]:
    """FedAvg written directly in PyTorch: what a researcher would write without a framework."""
    task, device = get_task(config.task), select_device(config.train.device)
    torch.manual_seed(config.seed)
    global_model = build_model(config.task, config.model)
    global_state = {k: v.clone() for k, v in global_model.state_dict().items()}
    site_models = {name: build_model(config.task, config.model) for name in sites}
    for server_round in range(1, config.train.rounds + 1):
        states, weights = [], []
        for name in sorted(sites):
            model = site_models[name]
            model.load_state_dict(global_state)
            result = train_local(
                model,
                sites[name].train,
                task=task,
                train=config.train,
                epochs=config.train.local_epochs,
                seed=site_seed(config.seed, name, server_round),
                device=device,
            )
            states.append({k: v.detach().cpu() for k, v in model.state_dict().items()})
            weights.append(result.num_examples)
        total = sum(weights)
        # Same arithmetic as Flower's FedAvg (numpy float32, weights as Python floats, fixed order).
        averaged = {}
        for key in global_state:
            value = None
            for state, weight in zip(states, weights):
                term = state[key].numpy() * (weight / total)
                value = term if value is None else value + term
            averaged[key] = torch.from_numpy(value)
        global_state = averaged
        if config.train.evaluates(server_round, scan_geometry=config.task.scan_geometry):
            global_model.load_state_dict(global_state)
            for name in sorted(sites):
                task.evaluate(global_model, sites[name].val, device=device)
    return global_state


def engine_run(config: RunConfig, *, engine: str) -> dict[str, torch.Tensor]:
    on_engine = config.model_copy(update={"engine": config.engine.model_copy(update={"name": engine})})
    run_dir = run_engine(on_engine, name=f"bench-{engine}")
    return torch.load(run_dir / "checkpoints" / "final.pt", weights_only=False)["state_dict"]


def timed(function, *args, **kwargs) -> tuple[float, object]:
    started = time.perf_counter()
    value = function(*args, **kwargs)
    return time.perf_counter() - started, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ray", action="store_true", help="also time Flower's Ray simulation engine (once)")
    args = parser.parse_args()
    logging.getLogger("fedmed").setLevel(logging.WARNING)
    set_flower_verbosity(False)

    with tempfile.TemporaryDirectory() as scratch:
        config = demo_config(Path(scratch))
        sites = site_data(config)
        plain_times, engine_times, differing = [], [], set()
        for _ in range(args.repeats):  # interleaved so machine noise hits both alike
            seconds, plain_state = timed(plain_loop, config, sites)
            plain_times.append(seconds)
            seconds, engine_state = timed(engine_run, config, engine="inprocess")
            engine_times.append(seconds)
            # Every pair, not only the last: the timing compares the same work only if the models agree.
            differing |= {
                k for k in plain_state if k not in engine_state or not torch.equal(plain_state[k], engine_state[k])
            }
        identical = not differing
        plain, inprocess = statistics.median(plain_times), statistics.median(engine_times)
        # Each engine run is paired with the plain run just before it; the median of the pair ratios
        # is robust to the machine slowing down or speeding up between pairs.
        ratios = sorted(e / p for e, p in zip(engine_times, plain_times))
        rows = [("plain PyTorch loop", plain, 1.0), ("fedmed in-process engine", inprocess, statistics.median(ratios))]
        if args.ray:
            seconds, _ = timed(engine_run, config, engine="ray")
            rows.append(("fedmed on Flower's Ray engine (incl. Ray start)", seconds, seconds / plain))

    rounds, sites_count = config.train.rounds, len(config.sites)
    print(
        f"\nFramework overhead: demo segmentation, {sites_count} sites x {rounds} rounds x "
        f"{config.train.local_epochs} local epochs, median of {args.repeats} (torch threads: "
        f"{torch.get_num_threads()}, python {sys.version.split()[0]})"
    )
    print(f"{'run':<50}{'median s':>9}{'ratio':>8}")
    for name, seconds, ratio in rows:
        print(f"{name:<50}{seconds:>9.2f}{ratio:>7.3f}x")
    print(f"in-process/plain ratio per pair: {', '.join(f'{r:.3f}' for r in ratios)}")
    print(f"in-process model identical to the plain loop's: {identical}")
    if not identical:
        # Then the two did different work and the ratio above measures nothing: fail, not just print.
        print(
            f"error: the in-process engine's model differs from the plain loop's in {len(differing)} tensor(s) "
            f"(e.g. {sorted(differing)[0]}); the overhead figures are void until they agree again",
            file=sys.stderr,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()

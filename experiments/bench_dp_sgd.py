"""DP-SGD cost: step time and peak training memory with Opacus against the same non-private loop.

Each (model, mode) runs in its own process so peak memory is not shared between measurements;
training memory is the process's peak resident size (two warm-up batches included) less its resident
size just before the timed steps (CPU), or torch's peak allocation (CUDA); process memory is the whole
process's peak (what a site's machine must hold, ~500 MB of it imports).
Steps use the models and batch sizes of the run configs: the demo's 2D segmentation UNet, the 3D
segmentation UNet and the small DenseNet classifier.

    python experiments/bench_dp_sgd.py [--steps 20] [--batch 4 16 32] [--trainable all adapters head norm]

--batch measures at those batch sizes (the same for both runs) instead of the configs' own; DP-SGD's
per-sample work is a fixed cost per layer and step, so larger physical batches ([dp_sgd]
physical_batch_size) amortize it. --trainable measures DP-SGD training only that part ([dp_sgd] trainable;
adapters of rank 4), each against the same plain run, which trains every parameter (what a non-private
fine-tune does). Targets: time <= 1.5x, training memory <= 1.3x the non-private run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

DEMO = "demo"  # the packaged demo config (fedmed.api.demo_config)
CONFIGS = {
    "segmentation 2D (demo UNet)": DEMO,
    "segmentation 3D (UNet)": "experiments/configs/segmentation-3d-fedprox.toml",
    "classification (DenseNet)": "experiments/configs/classification-2d-fedbn.toml",
}


def measure(config_path: str, *, private: bool, steps: int, batch: int | None, trainable: str) -> dict[str, float]:
    # Here, not at the top: the parent process only starts the measurements, each in a child of its own.
    import torch

    from fedmed.api import build_model, demo_config, get_task, load_config
    from fedmed.api.bench import DpSgdStep, check_private_model, fixed_by_trainable, select_device, train_local

    config = demo_config() if config_path == DEMO else load_config(config_path)
    config.train.augment = False
    config.train.batch_size = batch or config.train.batch_size
    torch.set_num_threads(2)
    device = select_device(config.train.device)
    task = get_task(config.task)
    model = build_model(config.task, config.model)
    generator = torch.Generator().manual_seed(0)
    size = config.task.image_size
    samples = []
    for _ in range(config.train.batch_size * steps):
        image = torch.randn(1, *size, generator=generator)
        if config.task.kind == "segmentation":
            label = (torch.rand(1, *size, generator=generator) > 0.7).long()
        else:
            label = torch.randint(0, config.task.num_classes, (), generator=generator)
        samples.append({"image": image, "label": label})
    common = {"task": task, "train": config.train, "epochs": 1, "seed": 0, "device": device}
    warm = samples[: config.train.batch_size * 2]
    dp = None
    if private:
        check_private_model(model, model_name=config.model.name)
        fixed = fixed_by_trainable(model, trainable)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name not in fixed)
        dp = DpSgdStep(noise_multiplier=1.0, max_grad_norm=1.0, adapter_rank=4 if trainable == "adapters" else 0)
    train_local(model, warm, dp=dp, **common)  # warm-up: imports, functorch compilation
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = _resident_mb()
    result = train_local(model, samples, dp=dp, **common)
    process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else process_peak - before
    return {
        "step_s": result.seconds / result.steps,
        "memory_mb": max(peak, 0.0),
        "process_mb": process_peak,
        "batch": config.train.batch_size,
    }


def _resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, nargs="+", default=[None], help="batch sizes (default: the configs')")
    parser.add_argument(
        "--trainable",
        nargs="+",
        default=["all"],
        choices=["all", "adapters", "head", "norm"],
        help="what DP-SGD trains",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--private", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--one-batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        measured = measure(
            args.one, private=args.private, steps=args.steps, batch=args.one_batch, trainable=args.trainable[0]
        )
        print(json.dumps(measured))
        return
    print()
    print(
        "| model | DP-SGD trains | batch | plain s/step | DP s/step | time | training MB plain / DP | training memory "
        "| process MB plain / DP | process memory |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, path in CONFIGS.items():
        for batch in args.batch:
            plain = _child(path, steps=args.steps, batch=batch, private=False, trainable="all")
            for trainable in args.trainable:
                dp = _child(path, steps=args.steps, batch=batch, private=True, trainable=trainable)
                cells = [
                    name,
                    trainable,
                    str(plain["batch"]),
                    f"{plain['step_s']:.3f}",
                    f"{dp['step_s']:.3f}",
                    f"{dp['step_s'] / plain['step_s']:.2f}×",
                    f"{plain['memory_mb']:.0f} / {dp['memory_mb']:.0f}",
                    f"{dp['memory_mb'] / max(plain['memory_mb'], 1.0):.2f}×",
                    f"{plain['process_mb']:.0f} / {dp['process_mb']:.0f}",
                    f"{dp['process_mb'] / plain['process_mb']:.2f}×",
                ]
                print("| " + " | ".join(cells) + " |", flush=True)


def _child(path: str, *, steps: int, batch: int | None, private: bool, trainable: str) -> dict[str, float]:
    """One measurement in a process of its own, so that peak memory is its own."""
    command = [sys.executable, __file__, "--one", path, "--steps", str(steps), "--trainable", trainable]
    command += (["--private"] if private else []) + (["--one-batch", str(batch)] if batch else [])
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


if __name__ == "__main__":
    main()

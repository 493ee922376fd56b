"""Sliding-window inference: seconds and peak memory per 240×240×155 two-channel brain volume.

What fedmed runs on a validation or `predict` volume: the case goes through fedmed's scan preprocessing
(`fedmed.api.bench.scan_preprocessing`: load FLAIR + T1 as two channels, reorient, resample to task.spacing,
z-score), then `predict_volume` with fedmed's `sliding_window_inferer` (Gaussian blending, windows on the
device, the stitched volume in host memory) and the default segmentation UNet from `build_model` with
in_channels 2 (random weights: this measures speed, not accuracy). At 1 mm the network sees 2×240×240×155;
at 2 mm the resampled 2×120×120×78. The inversion onto the source grid that evaluation adds
(`to_original_grid` + argmax) is timed once per configuration, apart.

The volume is BraTS 2018 case_0 from ../shared/data/brats2018-10 (FLAIR, T1) when present, else a
synthetic pair of NIfTI files of the same size, spacing and orientation (LPS). Each configuration runs in a
fresh child process, so its peak RSS (VmHWM) is its own; seconds are the median over --repeats runs, after
one warm-up run on CUDA. The ratio is against the first row (CPU, 1 mm, the first roi).

    python experiments/bench_sliding_window.py [--quick] [--repeats 3] [--rois 96 64] [--spacings 1 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BRATS = Path(__file__).resolve().parents[2] / "shared" / "data" / "brats2018-10" / "case_0"
SHAPE = (240, 240, 155)


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return math.nan


def synthetic_case(folder: Path) -> list[Path]:
    """Two smooth random volumes written like BraTS's: 240×240×155 float32 at 1 mm, LPS."""
    import numpy as np
    from scipy.ndimage import gaussian_filter

    from fedmed.api.bench import write_nifti

    rng = np.random.default_rng(0)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS, as the BraTS files are stored
    paths = []
    for name in ("FLAIR", "T1"):
        volume = gaussian_filter(rng.standard_normal(SHAPE, dtype=np.float32), sigma=4).astype(np.float32)
        path = folder / f"{name}.nii.gz"
        write_nifti(path, volume, affine=affine)
        paths.append(path)
    return paths


def windows(shape: list[int], *, roi: int, overlap: float) -> int:
    """How many windows MONAI's sliding window visits (its scan interval: roi × (1 − overlap))."""
    interval = max(int(roi * (1 - overlap)), 1)
    return math.prod(1 if size <= roi else math.ceil((size - roi) / interval) + 1 for size in shape)


def child(*, images: list[str], spacing: float, roi: int, device_name: str, setup: dict) -> None:
    """Preprocess one case, time the sliding window `repeats` times, print one JSON line."""
    # Here, not at the top: only the child processes, whose peak RSS is measured, need these.
    import torch

    from fedmed.api import InferenceConfig, ModelConfig, NormalizationConfig, TaskConfig, build_model
    from fedmed.api.bench import predict_volume, scan_preprocessing, sliding_window_inferer, to_original_grid

    logging.getLogger("fedmed").setLevel(logging.WARNING)
    device = torch.device(device_name)
    task = TaskConfig(kind="segmentation", spatial_dims=3, spacing=[spacing] * 3, in_channels=len(images))
    transform = scan_preprocessing(task, NormalizationConfig(), with_label=False)
    started = time.perf_counter()
    image = transform({"image": images})["image"]
    preprocess_s = time.perf_counter() - started
    torch.manual_seed(0)
    model = build_model(task, ModelConfig()).to(device).eval()
    inference = InferenceConfig(overlap=setup["overlap"], blend="gaussian", sw_batch_size=setup["sw_batch"])
    inferer = sliding_window_inferer(roi_size=[roi] * 3, inference=inference, device=device)
    if device.type == "cuda":
        predict_volume(model, image, inferer=inferer, device=device)  # warm-up: kernels, allocator
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for _ in range(setup["repeats"]):
        started = time.perf_counter()
        # predict_volume returns the stitched output on the CPU, so the clock stops after the device is done.
        logits = predict_volume(model, image, inferer=inferer, device=device)
        seconds.append(time.perf_counter() - started)
    started = time.perf_counter()
    restored = to_original_grid(logits.softmax(dim=0), image=image, preprocessing=transform)
    labelmap = restored.argmax(dim=0, keepdim=True)
    invert_s = time.perf_counter() - started
    print(
        json.dumps(
            {
                "input": list(image.shape),
                "output": list(labelmap.shape),
                "windows": windows(list(image.shape[1:]), roi=roi, overlap=setup["overlap"]),
                "preprocess_s": preprocess_s,
                "seconds": seconds,
                "invert_s": invert_s,
                "peak_rss_mb": status_mb("VmHWM"),
                "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
                "threads": torch.get_num_threads(),
            }
        )
    )


def measure(*, images: list[Path], spacing: float, roi: int, device: str, setup: dict) -> dict:
    request = {"images": [str(path) for path in images], "spacing": spacing, "roi": roi, "device_name": device}
    command = [sys.executable, __file__, "--child", json.dumps({**request, "setup": setup})]
    completed = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{device}, {spacing} mm, roi {roi} failed (exit {completed.returncode})")
    return {**request, **json.loads(completed.stdout.strip().splitlines()[-1])}


def print_table(rows: list[dict], *, source: str, setup: dict) -> None:
    print(
        f"\nSliding-window inference per volume: {source}, default segmentation UNet (in_channels 2, random "
        f"weights), overlap {setup['overlap']}, Gaussian blending, sw_batch_size {setup['sw_batch']}; median of "
        f"{setup['repeats']} run(s); peak RSS of a fresh process per row (preprocessing included); ratio against "
        "the first row.\n"
    )
    print(
        "| device | spacing mm | network input | roi | windows | s / volume | ratio | invert s | preprocess s "
        "| peak RSS MB | peak GPU MB |"
    )
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    baseline = statistics.median(rows[0]["seconds"])
    for row in rows:
        median = statistics.median(row["seconds"])
        gpu = "" if row["peak_gpu_mb"] is None else f"{row['peak_gpu_mb']:.0f}"
        print(
            f"| {row['device_name']} | {row['spacing']:g} | {'×'.join(map(str, row['input']))} | {row['roi']}³ "
            f"| {row['windows']} | {median:.2f} | {median / baseline:.2f} | {row['invert_s']:.2f} "
            f"| {row['preprocess_s']:.2f} | {row['peak_rss_mb']:.0f} | {gpu} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="roi 96³ only, one run each (about a minute on CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rois", type=int, nargs="+", default=[96, 64], help="window edge in voxels (÷ 4)")
    parser.add_argument("--spacings", type=float, nargs="+", default=[1.0, 2.0], help="task.spacing in mm")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--sw-batch", type=int, default=4, help="inference.sw_batch_size")
    parser.add_argument("--devices", nargs="+", help="default: cpu, and cuda when torch sees a GPU")
    parser.add_argument("--brats", type=Path, default=BRATS, help="a BraTS case folder holding FLAIR and T1")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        request = json.loads(args.child)
        child(
            images=request["images"],
            spacing=request["spacing"],
            roi=request["roi"],
            device_name=request["device_name"],
            setup=request["setup"],
        )
        return
    if any(roi % 4 for roi in args.rois):
        parser.error(f"--rois {args.rois}: the default UNet downsamples by 4; give multiples of 4")

    import torch

    devices = args.devices or ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    rois = args.rois[:1] if args.quick else args.rois
    setup = {"repeats": 1 if args.quick else args.repeats, "overlap": args.overlap, "sw_batch": args.sw_batch}
    with tempfile.TemporaryDirectory() as scratch:
        images = [args.brats / "FLAIR.nii.gz", args.brats / "T1.nii.gz"]
        if all(path.is_file() for path in images):
            source = f"BraTS 2018 {args.brats.name} (FLAIR + T1, 240×240×155 at 1 mm)"
        else:
            images = synthetic_case(Path(scratch))
            source = "a synthetic FLAIR + T1 pair (240×240×155 at 1 mm; no BraTS files found)"
        rows = []
        for device in devices:
            for spacing in args.spacings:
                for roi in rois:
                    row = measure(images=images, spacing=spacing, roi=roi, device=device, setup=setup)
                    rows.append(row)
                    print(
                        f"{device} {spacing:g} mm roi {roi}: {statistics.median(row['seconds']):.2f} s",
                        file=sys.stderr,
                        flush=True,
                    )
    print_table(rows, source=source, setup=setup)


if __name__ == "__main__":
    main()

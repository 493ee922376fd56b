"""Two-modality scan-geometry sites whose volumes differ in spacing, orientation and size (real NIfTI)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from fedmed.config import run_config_from_dict
from fedmed.workflows.simulate import simulate

# Each site stores its volumes differently: spacing, orientation and size all differ.
SITES = {
    "site-a": (np.diag([1.0, 1.0, 1.0, 1.0]), (28, 28, 24)),
    "site-b": (np.diag([-0.8, -0.8, 2.0, 1.0]), (34, 34, 12)),
}


def write_scan_site(root: Path, name: str, *, cases: int, seed: int) -> Path:
    affine, shape = SITES[name]
    site = root / name
    (site / "images").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    entries = []
    for number in range(cases):
        centre = [rng.integers(size // 3, 2 * size // 3) for size in shape]
        grid = np.meshgrid(*[np.arange(size) for size in shape], indexing="ij")
        spacing = np.abs(np.diag(affine)[:3])
        distance = np.sqrt(sum(((axis - c) * s) ** 2 for axis, c, s in zip(grid, centre, spacing, strict=True)))
        label = ((distance < 7).astype(np.uint8) + (distance < 3.5).astype(np.uint8)).astype(np.uint8)
        flair = (50 + 60 * (label > 0) + rng.normal(0, 4, shape)).astype(np.float32)
        t1 = (200 - 80 * (label == 2) + rng.normal(0, 4, shape)).astype(np.float32)
        paths = []
        for modality, array in (("flair", flair), ("t1", t1)):
            path = site / "images" / f"{name}_{number}_{modality}.nii.gz"
            nib.save(nib.Nifti1Image(array, affine), str(path))
            paths.append(f"./images/{path.name}")
        label_path = site / "images" / f"{name}_{number}_label.nii.gz"
        nib.save(nib.Nifti1Image(label, affine), str(label_path))
        entries.append({"image": paths, "label": f"./images/{label_path.name}"})
    manifest = {
        "name": name,
        "modality": {"0": "FLAIR", "1": "T1"},
        "labels": {"0": "background", "1": "Oedema", "2": "Core"},
        "training": entries[2:],
        "validation": entries[:2],
    }
    (site / "dataset.json").write_text(json.dumps(manifest))
    return site


def simulate_scan_run(root: Path, *, name: str) -> Path:
    """A finished one-round federation of site-a and site-b (two modalities, FLAIR and T1, at native spacing)."""
    sites = [
        {"name": site, "path": str(write_scan_site(root, site, cases=4, seed=i))}
        for i, site in enumerate(("site-a", "site-b"))
    ]
    config = run_config_from_dict(
        {
            "name": name,
            "output_dir": str(root / "runs"),
            "task": {"kind": "segmentation", "spatial_dims": 3, "num_classes": 3, "spacing": [1.2, 1.2, 1.2]},
            "model": {"channels": [8, 16, 32]},
            "train": {"rounds": 1, "batch_size": 2, "learning_rate": 0.01, "patch_size": [16, 16, 16]},
            "sites": sites,
            "evaluation": {"cross_site": False},
        },
        base=root,
    )
    return simulate(config).run_dir.path

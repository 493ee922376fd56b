"""Site-level intensity normalization at native resolution: two scanners, one ×3 the other, look alike to the model."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scan_sites import write_scan_site

from fedmed.config import run_config_from_dict
from fedmed.data.normalization import ScanIntensityStats, foreground_mask
from fedmed.data.scan_site import open_scan_site
from fedmed.workflows.simulate import simulate

SCALES = {"site-a": 1.0, "site-b": 3.0}


def _scaled_site(root: Path, name: str, *, scale: float, seed: int) -> Path:
    """scan_sites' two-modality site, its images multiplied by `scale` (a scanner with another gain)."""
    site = write_scan_site(root, name, cases=4, seed=seed)
    for path in (site / "images").glob("*.nii.gz"):
        if path.name.endswith("_label.nii.gz"):
            continue
        image = nib.load(path)
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj) * np.float32(scale), image.affine), str(path))
    return site


def _foreground_summary(scan: object) -> tuple[np.ndarray, np.ndarray]:
    """Per channel: (raw foreground mean, normalized foreground [mean, std, 90th percentile]) over training cases."""
    raw_values: list[list[np.ndarray]] = [[], []]
    normalized_values: list[list[np.ndarray]] = [[], []]
    for volume in scan.training_volumes():
        normalized = scan.intensity({"image": volume})["image"]
        for channel in range(volume.shape[0]):
            mask = foreground_mask(volume[channel], rule="mean")
            raw_values[channel].append(volume[channel][mask].double().numpy())
            normalized_values[channel].append(normalized[channel][mask].double().numpy())
    raw = np.array([np.concatenate(values).mean() for values in raw_values])
    summary = []
    for values in normalized_values:
        merged = np.concatenate(values)
        summary.append([merged.mean(), merged.std(), np.percentile(merged, 90)])
    return raw, np.array(summary)


@pytest.mark.slow
def test_site_zscore_federation_at_native_spacing_matches_two_scanners(tmp_path: Path) -> None:
    sites = [
        {"name": name, "path": str(_scaled_site(tmp_path, name, scale=scale, seed=index))}
        for index, (name, scale) in enumerate(SCALES.items())
    ]
    config = run_config_from_dict(
        {
            "name": "scan-site-zscore",
            "output_dir": str(tmp_path / "runs"),
            "task": {
                "kind": "segmentation",
                "spatial_dims": 3,
                "num_classes": 3,
                "spacing": [1.2, 1.2, 1.2],
                "intensity": "site_zscore",
            },
            "model": {"channels": [8, 16, 32]},
            "train": {"rounds": 1, "batch_size": 2, "learning_rate": 0.01, "patch_size": [16, 16, 16]},
            "data": {"cache": "disk"},
            "sites": sites,
            "evaluation": {"cross_site": False},
        },
        base=tmp_path,
    )
    result = simulate(config)
    run = result.run_dir.path
    for name in SCALES:
        assert np.isfinite(result.summary["sites"][name]["federated"]["dice"])
    # The run's intensity exchange happened in scan geometry and is in the report's record.
    recorded = json.loads((run / "normalization.json").read_text())
    assert recorded["method"] == "site_zscore"
    assert {name: entry["num_images"] for name, entry in recorded["sites"].items()} == {"site-a": 2, "site-b": 2}
    assert all(sum(entry["after"]["counts"]) > 0 for entry in recorded["sites"].values())

    summaries = {}
    for entry in sites:
        state = json.loads((run / "sites" / entry["name"] / "normalization.json").read_text())
        stats = ScanIntensityStats.from_json(state["scan"]["stats"])
        scan = open_scan_site(Path(entry["path"]), config=result.config, cache_dir=None)
        assert scan.intensity_key == state["scan"]["key"]  # the statistics of exactly these training cases
        scan.use_intensity(stats)
        summaries[entry["name"]] = _foreground_summary(scan)
    (raw_a, normalized_a), (raw_b, normalized_b) = summaries["site-a"], summaries["site-b"]
    assert np.all(raw_b / raw_a > 2.5)  # the scanners differ ×3 in what they wrote...
    for site_summary in (normalized_a, normalized_b):  # ...and each site's inputs are centred and scaled
        assert np.allclose(site_summary[:, 0], 0.0, atol=1e-4)
        assert np.allclose(site_summary[:, 1], 1.0, atol=1e-4)
    assert np.allclose(normalized_a[:, 2], normalized_b[:, 2], atol=0.15)  # ...to the same shape

"""Synthetic multi-site federations written as real NIfTI site folders.

Every site gets its own random stream derived from (seed, site index, split, case), so a case's content
depends only on those and on the site's drift: the same config always writes the same voxels, and adding a
site or a case leaves the others unchanged.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from fedmed.config.schema import SiteDrift, SiteEntry, SynthConfig
from fedmed.core.log import logger

from .drift import apply_drift
from .io import nifti_affine, write_nifti
from .manifest import Case, write_manifest
from .phantoms import classification_phantom, enhancement_phantom, segmentation_phantom
from .problems import DataOutputError
from .sitedir import check_replaceable, is_empty_dir, listed_files_exist, publish, staging_dir, stored_fedmed_section

# Bump when the generated content changes, so folders made by older code are not silently reused.
GENERATOR_VERSION = 1
GENERATOR = "fedmed.data.synth"
SPLIT_IDS = {"training": 0, "validation": 1}
SEGMENTATION_LABELS = {0: "background", 1: "lesion"}
CLASSIFICATION_LABELS = {0: "normal", 1: "lesion"}
# Lesions stay inside the organ, which fills about a quarter (3D) or half (2D) of the image.
REACHABLE_PREVALENCE = {2: 0.15, 3: 0.1}


def synthesize_federation(config: SynthConfig, out_dir: Path, *, overwrite: bool = False) -> list[SiteEntry]:
    """Write one site folder per `config.sites` entry under `out_dir`; reuse folders made from the same config."""
    out_dir = Path(out_dir)
    started = time.perf_counter()
    entries: list[SiteEntry] = []
    for index, drift in enumerate(config.sites):
        target = out_dir / drift.name
        _warn_unreachable_prevalence(config, drift=drift)
        fingerprint = site_fingerprint(config, site_index=index)
        if not overwrite and _matches(target, fingerprint):
            logger.info("reusing synthetic site %s (fingerprint %s)", target, fingerprint)
        else:
            _refuse_foreign(target, fingerprint=fingerprint, overwrite=overwrite)
            with staging_dir(out_dir, name=drift.name) as staging:
                _write_site(staging, config=config, site_index=index, fingerprint=fingerprint)
                if not publish(staging, target, replace=overwrite) and not _matches(target, fingerprint):
                    _refuse_foreign(target, fingerprint=fingerprint, overwrite=False)
        entries.append(SiteEntry(name=drift.name, path=target.resolve()))
    logger.info("synthetic federation in %s: %d site(s), %.2f s", out_dir, len(entries), time.perf_counter() - started)
    return entries


def site_fingerprint(config: SynthConfig, *, site_index: int) -> str:
    """Hash of everything that determines one site's files (not the other sites)."""
    drift = config.sites[site_index]
    payload = {
        "generator": GENERATOR_VERSION,
        "task": config.task,
        "spatial_dims": config.spatial_dims,
        "image_size": list(config.image_size),
        "seed": config.seed,
        "site_index": site_index,
        "train_cases": drift.train_cases or config.train_cases,
        "val_cases": drift.val_cases or config.val_cases,
        "drift": drift.model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _matches(target: Path, fingerprint: str) -> bool:
    section = stored_fedmed_section(target)
    return bool(section) and section.get("synth_fingerprint") == fingerprint and listed_files_exist(target)


def _refuse_foreign(target: Path, *, fingerprint: str, overwrite: bool) -> None:
    if not target.exists() or is_empty_dir(target):
        return
    if overwrite:
        check_replaceable(target)
        return
    section = stored_fedmed_section(target)
    if section is None:
        reason = "it was not made by `fedmed synth` (no fedmed fingerprint in dataset.json)"
    elif section.get("synth_fingerprint") == fingerprint:
        reason = "it was made from this config but files listed in dataset.json are missing"
    else:
        reason = (
            f"it was made from a different synth config (fingerprint {section.get('synth_fingerprint')}, "
            f"this config gives {fingerprint})"
        )
    raise DataOutputError(
        f"{target}: site folder exists and {reason}. Fix: pass overwrite=True (CLI: --overwrite) to regenerate "
        "it, or choose another output folder"
    )


def _write_site(site_dir: Path, *, config: SynthConfig, site_index: int, fingerprint: str) -> None:
    drift = config.sites[site_index]
    shape = tuple(config.image_size)
    affine = nifti_affine(shape=shape)
    images_dir = site_dir / "imagesTr"
    labels_dir = site_dir / "labelsTr"
    images_dir.mkdir()
    if config.task == "segmentation":
        labels_dir.mkdir()
    counts = {"training": drift.train_cases or config.train_cases, "validation": drift.val_cases or config.val_cases}
    splits: dict[str, list[Case]] = {}
    number = 0
    for split, count in counts.items():
        rate = drift.label_prevalence or 0.5
        positives = _positive_flags(count, rate=rate, seed=[config.seed, site_index, SPLIT_IDS[split]])
        cases: list[Case] = []
        for case_index in range(count):
            rng = np.random.default_rng([config.seed, site_index, SPLIT_IDS[split], case_index])
            file_name = f"{drift.name}_{number:03d}.nii.gz"
            number += 1
            label: Path | int | None = None
            if config.task == "segmentation":
                image, label_map = segmentation_phantom(shape, rng=rng, prevalence=drift.label_prevalence)
                label = labels_dir / file_name
                write_nifti(label, label_map, affine=affine)
            elif config.task == "classification":
                image = classification_phantom(shape, rng=rng, positive=bool(positives[case_index]))
                label = int(positives[case_index])
            else:
                image = enhancement_phantom(shape, rng=rng)
            # Drift changes the images only: labels describe anatomy, not the scanner.
            write_nifti(images_dir / file_name, apply_drift(image, drift=drift, rng=rng), affine=affine)
            cases.append(Case(image=images_dir / file_name, label=label))
        splits[split] = cases
    labels = {"segmentation": SEGMENTATION_LABELS, "classification": CLASSIFICATION_LABELS}.get(config.task, {})
    write_manifest(
        site_dir,
        name=drift.name,
        labels=labels,
        modality={0: "synthetic"},
        training=splits["training"],
        validation=splits["validation"],
        tensor_image_size=f"{config.spatial_dims}D",
        fedmed={
            "generator": GENERATOR,
            "generator_version": GENERATOR_VERSION,
            "synth_fingerprint": fingerprint,
            "task": config.task,
            "seed": config.seed,
            "site_index": site_index,
            "drift": drift.model_dump(mode="json"),
        },
    )


def _warn_unreachable_prevalence(config: SynthConfig, *, drift: SiteDrift) -> None:
    reachable = REACHABLE_PREVALENCE[config.spatial_dims]
    if config.task == "segmentation" and drift.label_prevalence is not None and drift.label_prevalence > reachable:
        logger.warning(
            "site %s: label_prevalence %.2f is more than lesions inside the phantom organ can cover in %dD "
            "(about %.2f); the foreground fraction will fall short of it",
            drift.name,
            drift.label_prevalence,
            config.spatial_dims,
            reachable,
        )


def _positive_flags(count: int, *, rate: float, seed: list[int]) -> np.ndarray:
    """Exactly round(rate * count) positives in random order, both classes present when count >= 2."""
    positives = round(rate * count)
    if count >= 2:
        positives = min(max(positives, 1), count - 1)
    flags = np.zeros(count, dtype=bool)
    flags[:positives] = True
    return np.random.default_rng(seed).permutation(flags)

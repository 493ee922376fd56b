"""Synthetic multi-site federations written as real NIfTI site folders.

Every site gets its own random stream derived from (seed, site index, split, case), so a case's content
depends only on those and on the site's drift: the same config always writes the same voxels, and adding a
site or a case leaves the others unchanged.

A config without the newer settings (one generic "MRI" modality, 2 classes, no spacing) keeps the voxel
phantoms and writes exactly the files it always did. Several or named modalities, nested label classes or
a voxel spacing switch to the scan phantoms: one co-registered file per modality (MSD list in
dataset.json), anatomy in millimetres written at each site's native spacing.

Cases are generated and written one at a time: memory stays that of one case whatever a site's size.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from fedmed.config import SiteDrift, SiteEntry, SynthConfig
from fedmed.core.log import logger

from ..io import nifti_affine, write_nifti
from ..manifest import Case, write_manifest
from ..problems import DataOutputError
from ..sitedir import check_replaceable, is_empty_dir, listed_files_exist, publish, staging_dir, stored_fedmed_section
from .drift import apply_drift
from .phantoms import (
    Grid,
    classification_phantom,
    enhancement_phantom,
    scan_classification_phantom,
    scan_enhancement_phantom,
    scan_segmentation_phantom,
    segmentation_phantom,
)

# Bump when the generated content changes, so folders made by older code are not silently reused.
GENERATOR_VERSION = 1
# The same for the scan phantoms alone: bumping it leaves the voxel phantoms' folders (and fingerprints) alone.
SCAN_PHANTOMS_VERSION = 1
# The name dataset.json has always recorded (the module before fedmed.data.synthetic): the files stay the same.
GENERATOR = "fedmed.data.synth"
SPLIT_IDS = {"training": 0, "validation": 1}
SEGMENTATION_LABELS = {0: "background", 1: "lesion"}
# Nested lesion compartments (BraTS-like): each label's region lies inside the one before.
NESTED_LABELS = {
    3: {0: "background", 1: "oedema", 2: "tumour core"},
    4: {0: "background", 1: "oedema", 2: "necrotic core", 3: "enhancing core"},
}
# The regions a run evaluates (task.regions): each the union of a compartment and those inside it.
NESTED_REGIONS = {
    3: {"whole": [1, 2], "core": [2]},
    4: {"whole": [1, 2, 3], "core": [2, 3], "enhancing": [3]},
}
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
        "drift": _drift_record(drift),
    }
    # Only settings away from their defaults join the hash: folders made before they existed stay reusable.
    if not uses_voxel_phantoms(config):
        payload.update(_scan_record(config, drift=drift))
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


def uses_voxel_phantoms(config: SynthConfig) -> bool:
    """Whether the config asks for nothing the voxel phantoms lack, and so gets their exact files."""
    return config.modalities == ["MRI"] and config.num_classes == 2 and not config.physical


def _drift_record(drift: SiteDrift) -> dict[str, object]:
    # Without a spacing the record is what it was before sites had one: existing folders keep their fingerprint.
    return drift.model_dump(mode="json", exclude={"spacing"} if drift.spacing is None else None)


def _scan_record(config: SynthConfig, *, drift: SiteDrift) -> dict[str, object]:
    return {
        "scan_phantoms_version": SCAN_PHANTOMS_VERSION,
        "modalities": list(config.modalities),
        "num_classes": config.num_classes,
        "spacing": config.site_spacing(drift),
        "field_of_view_mm": config.field_of_view_mm,
    }


def _write_site(site_dir: Path, *, config: SynthConfig, site_index: int, fingerprint: str) -> None:
    drift = config.sites[site_index]
    voxel = uses_voxel_phantoms(config)
    if voxel:
        shape = tuple(config.image_size)
        affine = nifti_affine(shape=shape)
        grid = None
    else:
        grid = Grid(tuple(config.site_shape(drift)), tuple(config.site_spacing(drift)))
        affine = _affine(grid)
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
            stem = f"{drift.name}_{number:03d}"
            number += 1
            positive = bool(positives[case_index])
            if grid is None:
                images, label_map = _voxel_case(config, drift=drift, positive=positive, rng=rng)
            else:
                images, label_map = _scan_case(config, grid=grid, drift=drift, positive=positive, rng=rng)
            label: Path | int | None = int(positive) if config.task == "classification" else None
            if label_map is not None:
                label = labels_dir / f"{stem}.nii.gz"
                write_nifti(label, label_map, affine=affine)
            paths = _image_paths(images_dir, stem=stem, count=len(images))
            for path, image in zip(paths, images):
                # Drift changes the images only (each modality on its own): labels describe anatomy, not the scanner.
                write_nifti(path, apply_drift(image, drift=drift, rng=rng), affine=affine)
            del images, label_map  # before the next case is drawn: one case in memory at a time
            cases.append(Case(image=paths[0], label=label, other_modalities=tuple(paths[1:])))
        splits[split] = cases
    write_manifest(
        site_dir,
        name=drift.name,
        labels=_labels(config),
        modality=dict(enumerate(config.modalities)),
        training=splits["training"],
        validation=splits["validation"],
        tensor_image_size=f"{config.spatial_dims}D",
        fedmed=_fedmed_section(config, site_index=site_index, fingerprint=fingerprint, voxel=voxel),
    )


def _voxel_case(
    config: SynthConfig, *, drift: SiteDrift, positive: bool, rng: np.random.Generator
) -> tuple[list[np.ndarray], np.ndarray | None]:
    """The voxel phantoms, drawn in the order they always were (the files depend on it)."""
    shape = tuple(config.image_size)
    if config.task == "segmentation":
        image, label_map = segmentation_phantom(shape, rng=rng, prevalence=drift.label_prevalence)
        return [image], label_map
    if config.task == "classification":
        return [classification_phantom(shape, rng=rng, positive=positive)], None
    return [enhancement_phantom(shape, rng=rng)], None


def _scan_case(
    config: SynthConfig, *, grid: Grid, drift: SiteDrift, positive: bool, rng: np.random.Generator
) -> tuple[list[np.ndarray], np.ndarray | None]:
    common = {
        "fov_mm": config.field_of_view_mm,
        "voxel_mm": min(config.reference_spacing),
        "modalities": config.modalities,
        "rng": rng,
    }
    if config.task == "segmentation":
        images, label_map = scan_segmentation_phantom(
            grid, num_classes=config.num_classes, prevalence=drift.label_prevalence, **common
        )
        return images, label_map
    if config.task == "classification":
        return scan_classification_phantom(grid, positive=positive, **common), None
    return scan_enhancement_phantom(grid, **common), None


def _image_paths(images_dir: Path, *, stem: str, count: int) -> list[Path]:
    if count == 1:
        return [images_dir / f"{stem}.nii.gz"]
    # One file per modality, numbered like nnU-Net's channels; dataset.json's "modality" names them.
    return [images_dir / f"{stem}_{index:04d}.nii.gz" for index in range(count)]


def _affine(grid: Grid) -> np.ndarray:
    """RAS affine with the grid's (possibly anisotropic) spacing, the field of view centred on the origin."""
    affine = np.eye(4)
    for axis, values in enumerate(grid.axes()[:3]):
        affine[axis, axis] = grid.spacing[axis]
        affine[axis, 3] = values[0]
    return affine


def _labels(config: SynthConfig) -> dict[int, str]:
    if config.task == "segmentation":
        return NESTED_LABELS.get(config.num_classes, SEGMENTATION_LABELS)
    return CLASSIFICATION_LABELS if config.task == "classification" else {}


def _fedmed_section(config: SynthConfig, *, site_index: int, fingerprint: str, voxel: bool) -> dict[str, object]:
    drift = config.sites[site_index]
    section: dict[str, object] = {
        "generator": GENERATOR,
        "generator_version": GENERATOR_VERSION,
        "synth_fingerprint": fingerprint,
        "task": config.task,
        "seed": config.seed,
        "site_index": site_index,
        "drift": _drift_record(drift),
    }
    if not voxel:
        section.update(_scan_record(config, drift=drift))
        if config.task == "segmentation" and config.num_classes > 2:
            section["regions"] = NESTED_REGIONS[config.num_classes]
    return section


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

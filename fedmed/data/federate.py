"""Turn one real labelled collection into a simulated multi-site federation.

Real collections often come from one hospital (IXI-HH: one Philips 3T), so site differences are
simulated with each site's drift; labels are only resampled and mapped, never drifted.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedmed.config.schema import SiteDrift, SiteEntry
from fedmed.core.log import logger

from .drift import apply_drift
from .io import ImageReadError, affine_of, read_image, write_nifti
from .manifest import Case, write_manifest
from .preprocess import resize_image, resize_label, squeeze_spatial, to_ras
from .problems import DataOutputError, DataProblem, DataValidationError
from .sitedir import check_replaceable, is_empty_dir, publish, staging_dir
from .validation import AFFINE_TOLERANCE_MM


def cases_from_folder_pairs(
    images_dir: Path,
    labels_dir: Path,
    *,
    image_glob: str = "*.nii.gz",
    label_for_image: Callable[[str], str] | None = None,
) -> list[Case]:
    """Pair every image in `images_dir` with its label file; `label_for_image` maps an image file name to
    the label file name (default: the same name). Missing labels are reported all at once."""
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    problems: list[DataProblem] = []
    if not images_dir.is_dir():
        problems.append(DataProblem(str(images_dir), "images folder not found", "check the path"))
    if not labels_dir.is_dir():
        problems.append(DataProblem(str(labels_dir), "labels folder not found", "check the path"))
    if problems:
        raise DataValidationError(problems, context="folder pairs")
    rename = label_for_image or (lambda name: name)
    cases: list[Case] = []
    for image in sorted(images_dir.glob(image_glob)):
        label = labels_dir / rename(image.name)
        if not label.is_file():
            problems.append(
                DataProblem(
                    str(label),
                    f"label file for {image.name} not found",
                    "add the label file or remove the image; check label_for_image maps names correctly",
                )
            )
            continue
        cases.append(Case(image=image.resolve(), label=label.resolve()))
    if not cases and not problems:
        problems.append(DataProblem(str(images_dir / image_glob), "no images match", "check the folder and image_glob"))
    if problems:
        raise DataValidationError(problems, context=f"pairing {images_dir} with {labels_dir}")
    return cases


def split_into_sites(
    cases: list[Case],
    *,
    drifts: list[SiteDrift],
    out_dir: Path,
    image_size: list[int] | None,
    binarize_labels: bool,
    val_fraction: float,
    seed: int,
    label_names: dict[int, str] | None = None,
    overwrite: bool = False,
) -> list[SiteEntry]:
    """Deal the cases at random (by `seed`) onto one site per drift and write each site folder.

    Images are read through MONAI (scale factors applied), reoriented to RAS when 3D, resampled to
    `image_size` when given, and drifted; label maps follow the same geometry with nearest-neighbour
    resampling. `drift.train_cases` / `val_cases` are ignored: real cases are dealt out, not generated.
    """
    out_dir = Path(out_dir)
    _check_arguments(cases, drifts=drifts, val_fraction=val_fraction, out_dir=out_dir, overwrite=overwrite)
    order = np.random.default_rng(seed).permutation(len(cases))
    entries: list[SiteEntry] = []
    for site_index, drift in enumerate(drifts):
        mine = [cases[int(position)] for position in order[site_index :: len(drifts)]]
        n_val = min(len(mine) - 1, max(1, round(val_fraction * len(mine))))
        target = out_dir / drift.name
        with staging_dir(out_dir, name=drift.name) as staging:
            written = [
                _write_case(
                    case,
                    site_dir=staging,
                    file_name=f"{drift.name}_{number:03d}.nii.gz",
                    drift=drift,
                    rng=np.random.default_rng([seed, site_index, number]),
                    image_size=image_size,
                    binarize_labels=binarize_labels,
                )
                for number, case in enumerate(mine)
            ]
            values = sorted({value for _, found in written for value in found})
            names = label_names or _default_label_names(values, binarized=binarize_labels)
            write_manifest(
                staging,
                name=drift.name,
                labels=names,
                modality={0: "MRI"},
                training=[case for case, _ in written[n_val:]],
                validation=[case for case, _ in written[:n_val]],
                tensor_image_size=f"{len(image_size) if image_size else 3}D",
                fedmed={"generator": "fedmed.data.federate", "seed": seed, "drift": drift.model_dump(mode="json")},
            )
            if not publish(staging, target, replace=overwrite):
                raise DataOutputError(f"{target}: was created by another process meanwhile. Fix: run again")
        logger.info("site %s: %d train, %d val cases -> %s", drift.name, len(mine) - n_val, n_val, target)
        entries.append(SiteEntry(name=drift.name, path=target.resolve()))
    return entries


def _check_arguments(
    cases: list[Case], *, drifts: list[SiteDrift], val_fraction: float, out_dir: Path, overwrite: bool
) -> None:
    if not drifts:
        raise ValueError("split_into_sites needs at least one SiteDrift (one per site)")
    if len({drift.name for drift in drifts}) != len(drifts):
        raise ValueError("split_into_sites: site names (drift.name) must be unique")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if len(cases) < 2 * len(drifts):
        raise ValueError(
            f"{len(cases)} case(s) cannot fill {len(drifts)} site(s) with a training and a validation case each; "
            f"use at most {len(cases) // 2} site(s) or add cases"
        )
    unlabelled = [case.image.name for case in cases if not isinstance(case.label, Path)]
    if unlabelled:
        raise ValueError(f"split_into_sites needs label-map cases; these have none: {', '.join(unlabelled[:5])}")
    for drift in drifts:
        target = out_dir / drift.name
        if target.exists() and not is_empty_dir(target):
            if not overwrite:
                raise DataOutputError(
                    f"{target}: site folder exists. Fix: pass overwrite=True to replace it, or choose another out_dir"
                )
            check_replaceable(target)


def _write_case(
    case: Case,
    *,
    site_dir: Path,
    file_name: str,
    drift: SiteDrift,
    rng: np.random.Generator,
    image_size: list[int] | None,
    binarize_labels: bool,
) -> tuple[Case, set[int]]:
    assert isinstance(case.label, Path)
    image, label = _read_pair(case)
    spatial_dims = len(image_size) if image_size else len(squeeze_spatial(image, spatial_dims=2).shape) - 1
    if spatial_dims == 3:
        image, label = to_ras(image.float()), to_ras(label.float())
    else:
        image, label = squeeze_spatial(image.float(), spatial_dims=2), squeeze_spatial(label.float(), spatial_dims=2)
    if image_size:
        image, label = resize_image(image, image_size), resize_label(label, image_size)
    affine = affine_of(image) if hasattr(image, "affine") else np.eye(4)
    label_array = np.rint(_numpy(label)[0])
    label_array = (label_array > 0) if binarize_labels else label_array
    image_array = apply_drift(_numpy(image)[0], drift=drift, rng=rng)
    images_dir, labels_dir = site_dir / "imagesTr", site_dir / "labelsTr"
    images_dir.mkdir(exist_ok=True)
    labels_dir.mkdir(exist_ok=True)
    write_nifti(images_dir / file_name, image_array, affine=affine)
    write_nifti(labels_dir / file_name, label_array.astype(_label_dtype(label_array)), affine=affine)
    found = {int(value) for value in np.unique(label_array)}
    return Case(image=images_dir / file_name, label=labels_dir / file_name), found


def _read_pair(case: Case) -> tuple[Any, Any]:
    problems: list[DataProblem] = []
    loaded = []
    for path in (case.image, case.label):
        try:
            loaded.append(read_image(Path(path)))  # type: ignore[arg-type]
        except ImageReadError as error:
            problems.append(DataProblem(str(path), f"cannot be read ({error})", "re-export or replace the file"))
    if problems:
        raise DataValidationError(problems, context="federating real cases")
    image, label = loaded
    # Labels are written with the image's geometry, so a mismatch here would silently misalign them.
    if tuple(image.shape[1:]) != tuple(label.shape[1:]):
        problems.append(
            DataProblem(
                str(case.label),
                f"label shape {tuple(label.shape[1:])} differs from image shape {tuple(image.shape[1:])}",
                "pair the label with the right image or resample it onto the image grid",
            )
        )
    elif float(np.max(np.abs(affine_of(image) - affine_of(label)))) > AFFINE_TOLERANCE_MM:
        problems.append(
            DataProblem(
                str(case.label),
                f"label affine differs from the affine of {Path(case.image).name}",
                "write the label map with the image's affine, or pair it with the right image",
            )
        )
    if problems:
        raise DataValidationError(problems, context="federating real cases")
    return image, label


def _numpy(tensor: Any) -> np.ndarray:
    return np.asarray(tensor.detach().cpu().numpy())


def _label_dtype(labels: np.ndarray) -> type:
    top = int(labels.max()) if labels.size else 0
    return np.uint8 if top < 256 else np.uint16 if top < 65536 else np.int32


def _default_label_names(values: list[int], *, binarized: bool) -> dict[int, str]:
    if binarized:
        return {0: "background", 1: "foreground"}
    return {value: "background" if value == 0 else f"label_{value}" for value in values}

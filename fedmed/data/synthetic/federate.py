"""Turn one real labelled collection into a simulated multi-site federation.

Real collections often come from one hospital (IXI-HH: one Philips 3T), so site differences are
simulated with each site's drift; labels are only resampled and mapped, never drifted.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedmed.config import SiteDrift, SiteEntry
from fedmed.core.log import logger

from ..grid_check import AFFINE_TOLERANCE_MM, modality_grid_problems
from ..io import ImageReadError, affine_of, read_image, stack_modalities, write_nifti
from ..manifest import Case, write_manifest
from ..preprocess import resize_image, resize_label, squeeze_spatial, to_ras
from ..problems import DataOutputError, DataProblem, DataValidationError
from ..sitedir import check_replaceable, is_empty_dir, publish, staging_dir
from .drift import apply_drift

_GLOB_CHARACTERS = frozenset("*?[")


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


def cases_from_subfolders(root: Path, *, modalities: list[str], label: str, glob: str = "*") -> list[Case]:
    """One multi-modal case per folder of `root` matching `glob`, e.g. BraTS' `case_N/FLAIR.nii.gz, T1.nii.gz,
    GT_W.nii.gz` with `modalities=["FLAIR", "T1"], label="GT_W"`.

    Each name is a file name or a pattern that must match exactly one file in the case folder; a name
    without a dot or pattern characters means that name as NIfTI (`FLAIR` finds `FLAIR.nii.gz`). The
    modalities keep the given order (the network's channel order). Every missing or ambiguous file is
    reported at once.
    """
    root = Path(root)
    if not modalities:
        raise ValueError("cases_from_subfolders needs at least one modality name, e.g. modalities=['T1']")
    if not root.is_dir():
        raise DataValidationError([DataProblem(str(root), "case folder root not found", "check the path")])
    problems: list[DataProblem] = []
    cases: list[Case] = []
    for folder in sorted(path for path in root.glob(glob) if path.is_dir()):
        found = [_one_file(folder, name, role=f"modality '{name}'", problems=problems) for name in modalities]
        label_path = _one_file(folder, label, role="label", problems=problems)
        images = [path for path in found if path is not None]
        if label_path is not None and len(images) == len(found):
            cases.append(Case(image=images[0], label=label_path, other_modalities=tuple(images[1:])))
    if not cases and not problems:
        problems.append(
            DataProblem(str(root / glob), "no case folders match", "check the root folder and the glob pattern")
        )
    if problems:
        raise DataValidationError(problems, context=f"collecting cases from the folders of {root}")
    return cases


def _one_file(folder: Path, name: str, *, role: str, problems: list[DataProblem]) -> Path | None:
    pattern = name if "." in name or _GLOB_CHARACTERS & set(name) else f"{name}.nii*"
    matches = sorted(path for path in folder.glob(pattern) if path.is_file())
    if len(matches) == 1:
        return matches[0].resolve()
    if not matches:
        problems.append(
            DataProblem(
                str(folder / pattern),
                f"{role} file not found in {folder.name}",
                "add the file, remove the folder from the root, or check the name (it may be a pattern)",
            )
        )
    else:
        listed = ", ".join(path.name for path in matches[:4])
        problems.append(
            DataProblem(
                str(folder / pattern),
                f"{role} matches {len(matches)} files in {folder.name} ({listed})",
                "give a name or pattern that matches exactly one file per case folder",
            )
        )
    return None


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
    modality_names: dict[int, str] | None = None,
    overwrite: bool = False,
) -> list[SiteEntry]:
    """Deal the cases at random (by `seed`) onto one site per drift and write each site folder.

    Images are read through MONAI (scale factors applied), reoriented to RAS when 3D, resampled to
    `image_size` when given, and drifted; label maps follow the same geometry with nearest-neighbour
    resampling. `drift.train_cases` / `val_cases` are ignored: real cases are dealt out, not generated.

    A multi-modal case (several files, or one 4D file) is written as one NIfTI per channel,
    `<site>_<NNN>_<channel:04d>.nii.gz` as nnU-Net names them, each drifted with the site's drift;
    `modality_names` (channel index -> name, default {0: "MRI"} for one channel) becomes the manifest's
    "modality" and must name every channel.
    """
    out_dir = Path(out_dir)
    _check_arguments(
        cases,
        drifts=drifts,
        val_fraction=val_fraction,
        out_dir=out_dir,
        overwrite=overwrite,
        modality_names=modality_names,
    )
    order = np.random.default_rng(seed).permutation(len(cases))
    entries: list[SiteEntry] = []
    modalities = dict(modality_names) if modality_names else None
    for site_index, drift in enumerate(drifts):
        mine = [cases[int(position)] for position in order[site_index :: len(drifts)]]
        n_val = min(len(mine) - 1, max(1, round(val_fraction * len(mine))))
        target = out_dir / drift.name
        with staging_dir(out_dir, name=drift.name) as staging:
            written: list[tuple[Case, set[int]]] = []
            for number, case in enumerate(mine):
                case_written, found = _write_case(
                    case,
                    site_dir=staging,
                    stem=f"{drift.name}_{number:03d}",
                    drift=drift,
                    rng=np.random.default_rng([seed, site_index, number]),
                    image_size=image_size,
                    binarize_labels=binarize_labels,
                    channels=len(modalities) if modalities else None,
                )
                # The first case written sets the channel count when no names were given.
                modalities = modalities or _default_modality_names(len(case_written.images))
                written.append((case_written, found))
            values = sorted({value for _, found in written for value in found})
            names = label_names or _default_label_names(values, binarized=binarize_labels)
            write_manifest(
                staging,
                name=drift.name,
                labels=names,
                modality=modalities or {0: "MRI"},
                training=[case for case, _ in written[n_val:]],
                validation=[case for case, _ in written[:n_val]],
                tensor_image_size=f"{len(image_size) if image_size else 3}D",
                # The generator name dataset.json has always recorded (before fedmed.data.synthetic): kept as is.
                fedmed={"generator": "fedmed.data.federate", "seed": seed, "drift": drift.model_dump(mode="json")},
            )
            if not publish(staging, target, replace=overwrite):
                raise DataOutputError(f"{target}: was created by another process meanwhile. Fix: run again")
        logger.info("site %s: %d train, %d val cases -> %s", drift.name, len(mine) - n_val, n_val, target)
        entries.append(SiteEntry(name=drift.name, path=target.resolve()))
    return entries


def _check_arguments(
    cases: list[Case],
    *,
    drifts: list[SiteDrift],
    val_fraction: float,
    out_dir: Path,
    overwrite: bool,
    modality_names: dict[int, str] | None,
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
    files = sorted({len(case.images) for case in cases})
    if len(files) > 1:
        raise ValueError(
            f"split_into_sites: cases list different numbers of modality files ({', '.join(map(str, files))}); "
            "give every case the same modalities in the same order"
        )
    if modality_names is not None and sorted(modality_names) != list(range(len(modality_names))):
        raise ValueError(
            f"modality_names keys must be the channel indices 0..{len(modality_names) - 1}, got "
            f"{sorted(modality_names)}; e.g. {{0: 'FLAIR', 1: 'T1'}}"
        )
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
    stem: str,
    drift: SiteDrift,
    rng: np.random.Generator,
    image_size: list[int] | None,
    binarize_labels: bool,
    channels: int | None,
) -> tuple[Case, set[int]]:
    """Write one case; `channels` is the count every case must have (None: any)."""
    assert isinstance(case.label, Path)
    image, label = _read_case(case)
    if channels is not None and image.shape[0] != channels:
        raise DataValidationError(
            [
                DataProblem(
                    str(case.image),
                    f"case has {image.shape[0]} image channel(s) but the cases before it (or modality_names) "
                    f"have {channels}",
                    "give every case the same modalities, and modality_names one name per channel",
                )
            ],
            context="federating real cases",
        )
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
    images_dir, labels_dir = site_dir / "imagesTr", site_dir / "labelsTr"
    images_dir.mkdir(exist_ok=True)
    labels_dir.mkdir(exist_ok=True)
    volumes = _numpy(image)
    # One file per channel; a single-channel case keeps the plain name it always had.
    names = [f"{stem}.nii.gz"] if len(volumes) == 1 else [f"{stem}_{index:04d}.nii.gz" for index in range(len(volumes))]
    for volume, name in zip(volumes, names):
        # The same drift for every modality, drawn in turn from one rng: each gets its own bias field and noise.
        write_nifti(images_dir / name, apply_drift(volume, drift=drift, rng=rng), affine=affine)
    label_name = f"{stem}.nii.gz"
    write_nifti(labels_dir / label_name, label_array.astype(_label_dtype(label_array)), affine=affine)
    found = {int(value) for value in np.unique(label_array)}
    paths = [images_dir / name for name in names]
    return Case(image=paths[0], label=labels_dir / label_name, other_modalities=tuple(paths[1:])), found


def _read_case(case: Case) -> tuple[Any, Any]:
    """Every modality (stacked as channels) and the label map, each checked against the first modality."""
    problems: list[DataProblem] = []
    loaded = []
    paths = [*case.images, case.label]
    for path in paths:
        try:
            loaded.append(read_image(Path(path)))  # type: ignore[arg-type]
        except ImageReadError as error:
            problems.append(DataProblem(str(path), f"cannot be read ({error})", "re-export or replace the file"))
    if problems:
        raise DataValidationError(problems, context="federating real cases")
    *parts, label = loaded
    problems.extend(modality_grid_problems(parts, paths=case.images, entry=f"case of {case.image.name}"))
    first = parts[0]
    # Labels are written with the image's geometry, so a mismatch here would silently misalign them.
    if tuple(first.shape[1:]) != tuple(label.shape[1:]):
        problems.append(
            DataProblem(
                str(case.label),
                f"label shape {tuple(label.shape[1:])} differs from image shape {tuple(first.shape[1:])}",
                "pair the label with the right image or resample it onto the image grid",
            )
        )
    elif float(np.max(np.abs(affine_of(first) - affine_of(label)))) > AFFINE_TOLERANCE_MM:
        problems.append(
            DataProblem(
                str(case.label),
                f"label affine differs from the affine of {Path(case.image).name}",
                "write the label map with the image's affine, or pair it with the right image",
            )
        )
    if problems:
        raise DataValidationError(problems, context="federating real cases")
    return stack_modalities(parts), label


def _numpy(tensor: Any) -> np.ndarray:
    return np.asarray(tensor.detach().cpu().numpy())


def _label_dtype(labels: np.ndarray) -> type:
    top = int(labels.max()) if labels.size else 0
    return np.uint8 if top < 256 else np.uint16 if top < 65536 else np.int32


def _default_modality_names(channels: int) -> dict[int, str]:
    return {0: "MRI"} if channels == 1 else {index: f"modality_{index}" for index in range(channels)}


def _default_label_names(values: list[int], *, binarized: bool) -> dict[int, str]:
    if binarized:
        return {0: "background", 1: "foreground"}
    return {value: "background" if value == 0 else f"label_{value}" for value in values}

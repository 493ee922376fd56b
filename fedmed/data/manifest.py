"""Medical Segmentation Decathlon style `dataset.json`, one per site folder.

Paths in the file are relative to the site folder ("./imagesTr/case_001.nii.gz"), so a site folder can be
moved or mounted elsewhere without editing it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedmed.core.files import write_text_atomic
from fedmed.core.log import logger

from .problems import DataProblem, DataValidationError, errors_in

MANIFEST_NAME = "dataset.json"
SPLITS = ("training", "validation")
# MSD's own keys plus "validation" (MONAI datalists) and "fedmed" (our synthesis fingerprint).
KNOWN_KEYS = frozenset(
    {
        "name",
        "description",
        "reference",
        "licence",
        "license",
        "release",
        "tensorImageSize",
        "modality",
        "labels",
        "numTraining",
        "numTest",
        "numValidation",
        "training",
        "test",
        "validation",
        "fedmed",
    }
)
ManifestKind = Literal["segmentation", "classification", "enhancement", "mixed"]


@dataclass(frozen=True)
class Case:
    """One case; `label` is a label-map path (segmentation), a class index, or None (enhancement).

    A multi-modal case (MSD: `"image": [flair, t1]`) keeps its first modality in `image` and the others,
    co-registered with it, in `other_modalities`; together they are the network's input channels.
    """

    image: Path
    label: Path | int | None = None
    other_modalities: tuple[Path, ...] = ()

    @property
    def images(self) -> tuple[Path, ...]:
        return (self.image, *self.other_modalities)


@dataclass(frozen=True)
class Manifest:
    name: str
    labels: dict[int, str]
    modality: dict[int, str]
    training: list[Case]
    validation: list[Case]
    source: Path
    fedmed: dict[str, Any] = field(default_factory=dict)

    @property
    def site_dir(self) -> Path:
        return self.source.parent

    @property
    def kind(self) -> ManifestKind:
        return infer_kind(self.training + self.validation)


def infer_kind(cases: list[Case]) -> ManifestKind:
    kinds = {_case_kind(case) for case in cases}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def _case_kind(case: Case) -> ManifestKind:
    if isinstance(case.label, Path):
        return "segmentation"
    if isinstance(case.label, int):
        return "classification"
    return "enhancement"


def read_manifest(site_dir: Path) -> Manifest:
    """Read `site_dir/dataset.json`; raises DataValidationError listing every structural problem."""
    manifest, problems = parse_manifest(Path(site_dir))
    for problem in problems:
        if problem.severity == "warning":
            logger.warning("%s", problem)
    if manifest is None or errors_in(problems):
        raise DataValidationError(problems, context=f"{Path(site_dir) / MANIFEST_NAME}")
    return manifest


def parse_manifest(site_dir: Path) -> tuple[Manifest | None, list[DataProblem]]:
    """Parse without raising: the validator wants every problem, including those after the first."""
    site_dir = Path(site_dir)
    if site_dir.name == MANIFEST_NAME and site_dir.is_file():
        site_dir = site_dir.parent
    source = site_dir / MANIFEST_NAME
    if not site_dir.exists():
        return None, [
            DataProblem(
                str(site_dir),
                "site folder not found",
                "check the site path in the config (relative paths start at the config file's folder) "
                "or create the data with `fedmed synth`",
            )
        ]
    if not site_dir.is_dir():
        return None, [
            DataProblem(
                str(site_dir),
                "is a file, not a site folder",
                "point the site path at a folder containing dataset.json, or at a MedMNIST-style .npz file",
            )
        ]
    if not source.is_file():
        return None, [
            DataProblem(
                str(source),
                "dataset.json not found in the site folder",
                'write one in Medical Segmentation Decathlon format, e.g. {"name": "site", "labels": '
                '{"0": "background", "1": "lesion"}, "training": [{"image": "./imagesTr/c1.nii.gz", '
                '"label": "./labelsTr/c1.nii.gz"}], "validation": [...]}',
            )
        ]
    try:
        raw = json.loads(source.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        return None, [
            DataProblem(
                str(source),
                f"not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}",
                f"fix the JSON syntax at line {error.lineno} (a missing comma or quote is the usual cause)",
            )
        ]
    except (OSError, UnicodeDecodeError) as error:
        return None, [DataProblem(str(source), f"cannot be read as UTF-8 text ({error})", "save it as UTF-8 JSON")]
    if not isinstance(raw, dict):
        return None, [
            DataProblem(str(source), "top level is not a JSON object", 'wrap the content in {...} with "training" etc.')
        ]
    return _manifest_from_dict(raw, source=source, site_dir=site_dir)


def _manifest_from_dict(
    raw: dict[str, Any], *, source: Path, site_dir: Path
) -> tuple[Manifest | None, list[DataProblem]]:
    where = str(source)
    problems: list[DataProblem] = []
    for key in sorted(set(raw) - KNOWN_KEYS):
        problems.append(
            DataProblem(
                where,
                f"unknown top-level key '{key}' is ignored",
                f"remove '{key}' or check its spelling against the MSD keys ({', '.join(sorted(KNOWN_KEYS))})",
                "warning",
            )
        )
    for key in SPLITS:
        if key not in raw:
            problems.append(
                DataProblem(
                    where,
                    f"missing required key '{key}'",
                    f'add "{key}": a list of cases, e.g. [{{"image": "./imagesTr/c1.nii.gz", '
                    f'"label": "./labelsTr/c1.nii.gz"}}]',
                )
            )
    name = raw.get("name", site_dir.name)
    if not isinstance(name, str) or not name:
        problems.append(DataProblem(where, f"'name' must be a non-empty string, got {name!r}", 'set "name": "my-site"'))
        name = site_dir.name
    labels = _int_keyed_strings(raw.get("labels", {}), key="labels", where=where, problems=problems)
    modality_raw = raw.get("modality", {})
    if isinstance(modality_raw, str):
        modality_raw = {"0": modality_raw}
    modality = _int_keyed_strings(modality_raw, key="modality", where=where, problems=problems)
    splits: dict[str, list[Case]] = {}
    for key in SPLITS:
        splits[key] = _cases(raw.get(key, []), key=key, where=where, site_dir=site_dir, problems=problems)
        if key in raw and isinstance(raw[key], list) and not raw[key]:
            problems.append(DataProblem(where, f"'{key}' is empty", f"list at least one case under '{key}'"))
    problems.extend(_cross_checks(raw, splits=splits, labels=labels, where=where))
    fedmed = raw.get("fedmed", {})
    if not isinstance(fedmed, dict):
        fedmed = {}
    if errors_in(problems):
        return None, problems
    manifest = Manifest(
        name=name,
        labels=labels,
        modality=modality,
        training=splits["training"],
        validation=splits["validation"],
        source=source.resolve(),
        fedmed=fedmed,
    )
    return manifest, problems


def _int_keyed_strings(value: Any, *, key: str, where: str, problems: list[DataProblem]) -> dict[int, str]:
    if not isinstance(value, dict):
        problems.append(
            DataProblem(
                where, f"'{key}' must be an object mapping index to name", f'write e.g. "{key}": {{"0": "..."}}'
            )
        )
        return {}
    result: dict[int, str] = {}
    for index, text in value.items():
        try:
            number = int(index)
        except (TypeError, ValueError):
            problems.append(
                DataProblem(where, f"'{key}' key {index!r} is not an integer", 'use integer keys such as "0", "1"')
            )
            continue
        if not isinstance(text, str):
            problems.append(DataProblem(where, f"'{key}'[{index!r}] must be a string name", 'write e.g. "1": "lesion"'))
            continue
        result[number] = text
    return result


def _cases(value: Any, *, key: str, where: str, site_dir: Path, problems: list[DataProblem]) -> list[Case]:
    if not isinstance(value, list):
        problems.append(DataProblem(where, f"'{key}' must be a list of cases", f'write "{key}": [{{"image": ...}}]'))
        return []
    cases: list[Case] = []
    for position, entry in enumerate(value):
        at = f"{key}[{position}]"
        if isinstance(entry, str):
            entry = {"image": entry}
        images = entry.get("image") if isinstance(entry, dict) else None
        if isinstance(images, str):
            images = [images]
        if not isinstance(images, list) or not images or not all(isinstance(p, str) and p for p in images):
            problems.append(
                DataProblem(
                    where,
                    f"{at} must be an object with an 'image' path string (or a list of them, one per modality), "
                    f"got {json.dumps(entry)[:80]}",
                    f'write {at} as {{"image": "./imagesTr/x.nii.gz", "label": ...}} or '
                    f'{{"image": ["./flair.nii.gz", "./t1.nii.gz"], ...}}',
                )
            )
            continue
        label = entry.get("label")
        parsed: Path | int | None
        if label is None:
            parsed = None
        elif isinstance(label, (bool, float)) or not isinstance(label, (str, int)):
            problems.append(
                DataProblem(
                    where,
                    f"{at} label {label!r} is neither a label file path nor an integer class",
                    "use a path string for segmentation or an integer class index for classification",
                )
            )
            continue
        elif isinstance(label, int):
            parsed = label
        else:
            parsed = _resolve(site_dir, label)
        paths = [_resolve(site_dir, text) for text in images]
        cases.append(Case(image=paths[0], label=parsed, other_modalities=tuple(paths[1:])))
    return cases


def _resolve(site_dir: Path, text: str) -> Path:
    return (site_dir / text).resolve() if not Path(text).is_absolute() else Path(text)


def _cross_checks(
    raw: dict[str, Any], *, splits: dict[str, list[Case]], labels: dict[int, str], where: str
) -> list[DataProblem]:
    problems: list[DataProblem] = []
    cases = splits["training"] + splits["validation"]
    if cases and infer_kind(cases) == "mixed":
        problems.append(
            DataProblem(
                where,
                "cases mix label files, integer classes and missing labels",
                "give every case the same kind of label: a path (segmentation), an integer (classification) "
                "or none (enhancement)",
            )
        )
    elif cases and infer_kind(cases) != "enhancement" and not labels:
        problems.append(
            DataProblem(
                where,
                "'labels' is missing or empty",
                'declare the label values, e.g. "labels": {"0": "background", "1": "lesion"}',
            )
        )
    overlap = {case.image for case in splits["training"]} & {case.image for case in splits["validation"]}
    modalities = sorted({len(case.images) for case in cases})
    if len(modalities) > 1:
        problems.append(
            DataProblem(
                where,
                f"cases list different numbers of modality files ({', '.join(map(str, modalities))})",
                "give every case the same modalities in the same order (the 'modality' key names them)",
            )
        )
    if overlap:
        problems.append(
            DataProblem(
                where,
                f"{len(overlap)} image(s) appear in both training and validation (e.g. {sorted(overlap)[0].name})",
                "put each case in one split only, or validation scores will be optimistic",
                "warning",
            )
        )
    declared = raw.get("numTraining")
    if isinstance(declared, int) and declared != len(splits["training"]):
        problems.append(
            DataProblem(
                where,
                f"numTraining is {declared} but 'training' lists {len(splits['training'])} cases",
                f"set numTraining to {len(splits['training'])}",
                "warning",
            )
        )
    return problems


def write_manifest(
    site_dir: Path,
    *,
    name: str,
    labels: dict[int, str],
    modality: dict[int, str] | str,
    training: list[Case],
    validation: list[Case],
    tensor_image_size: str,
    fedmed: dict[str, Any] | None = None,
) -> Path:
    """Write `site_dir/dataset.json` with paths relative to the site folder; returns the file's path.

    The cases' paths are read as any path is (absolute, or relative to the working folder), not as relative
    to `site_dir`."""
    site_dir = Path(site_dir)
    if isinstance(modality, str):
        modality = {0: modality}
    content: dict[str, Any] = {
        "name": name,
        "description": f"fedmed site '{name}'",
        "tensorImageSize": tensor_image_size,
        "modality": {str(key): value for key, value in sorted(modality.items())},
        "labels": {str(key): value for key, value in sorted(labels.items())},
        "numTraining": len(training),
        "numValidation": len(validation),
        "training": [_case_entry(case, site_dir) for case in training],
        "validation": [_case_entry(case, site_dir) for case in validation],
    }
    if fedmed is not None:
        content["fedmed"] = fedmed
    target = site_dir / MANIFEST_NAME
    # Readers in other processes must never see a half-written manifest.
    write_text_atomic(target, json.dumps(content, indent=2) + "\n", private=False)
    return target


def _case_entry(case: Case, site_dir: Path) -> dict[str, Any]:
    images = [_relative(path, site_dir) for path in case.images]
    entry: dict[str, Any] = {"image": images if len(images) > 1 else images[0]}
    if isinstance(case.label, Path):
        entry["label"] = _relative(case.label, site_dir)
    elif case.label is not None:
        entry["label"] = int(case.label)
    return entry


def _relative(path: Path, site_dir: Path) -> str:
    # A case's path names the file as this process sees it (absolute, or relative to the working folder, as
    # `site_dir / "imagesTr/x.nii.gz"` is when site_dir is relative): joining it onto site_dir again would
    # name a folder that does not exist.
    base = Path(site_dir).resolve()
    full = Path(path).resolve()
    try:
        return "./" + full.relative_to(base).as_posix()
    except ValueError:
        # Outside the site folder: keep it absolute rather than a fragile chain of "../".
        return str(full)

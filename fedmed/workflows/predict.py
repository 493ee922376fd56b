"""`fedmed predict`: a trained model applied to new scans, one output file (or CSV row) per case.

Inputs are NIfTI files (one per case), folders of them, or a dataset.json (its cases, multi-modal
ones included, as in training). Each case is checked like `fedmed site check` checks training data; a
bad case is reported in `cases.csv` with the reason and the fix, and the others still complete.
"""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel
import numpy as np

from fedmed.core.errors import FedmedError
from fedmed.core.files import atomic_path, unwritable_reason
from fedmed.core.log import logger
from fedmed.data.manifest import MANIFEST_NAME, Case
from fedmed.data.preprocess import PER_IMAGE_MODES
from fedmed.data.problems import DataProblem
from fedmed.data.validation import check_case_images
from fedmed.tasks.apply import Predictor
from fedmed.workflows.trained_model import TrainedModel

NIFTI_SUFFIXES = (".nii", ".nii.gz")
CASES_FILE = "cases.csv"  # one row per case: output file or the reason it failed
PROBABILITIES_FILE = "predictions.csv"  # classification: one row of class probabilities per case
OUTPUT_POSTFIX = {"segmentation": "seg", "enhancement": "enhanced"}  # <case>_<postfix>.nii.gz, like MONAI's SaveImage


class PredictOutputError(FedmedError):
    """The output folder cannot be written (read-only, full, or not ours)."""


@dataclass
class CaseOutcome:
    case: str
    output: str = ""
    error: str = ""
    probabilities: list[float] | None = None

    @property
    def ok(self) -> bool:
        return not self.error


def input_cases(inputs: Sequence[Path]) -> list[Case]:
    """Each NIfTI file is a case; a folder holds one case per NIfTI file (or a dataset.json); a dataset.json
    lists cases with one or several modalities ("image": [flair, t1, ...])."""
    cases: list[Case] = []
    for path in map(Path, inputs):
        if path.is_dir() and (path / MANIFEST_NAME).is_file():
            path = path / MANIFEST_NAME
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.name.endswith(NIFTI_SUFFIXES))
            if not files:
                raise FedmedError(f"{path}: no NIfTI files (.nii, .nii.gz) and no {MANIFEST_NAME} in this folder")
            cases += [Case(image=file) for file in files]
        elif path.name.endswith(".json"):
            cases += _manifest_cases(path)
        elif path.name.endswith(NIFTI_SUFFIXES) or path.exists():
            cases.append(Case(image=path))  # a missing or mistyped file is reported with its case
        else:
            raise FedmedError(f"{path}: not found; give NIfTI files, a folder of them or a {MANIFEST_NAME}")
    if not cases:
        raise FedmedError("no images given; name NIfTI files, a folder of them or a dataset.json")
    return cases


def _manifest_cases(path: Path) -> list[Case]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FedmedError(f"{path}: cannot be read as JSON ({error}); fix the file") from None
    entries = [entry for key in ("test", "validation", "training") for entry in raw.get(key, [])]
    cases = []
    for entry in entries:
        image = entry.get("image") if isinstance(entry, dict) else entry
        files = [image] if isinstance(image, str) else image
        if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
            raise FedmedError(
                f'{path}: entry {entry!r} names no image; write cases as "test": ["./imagesTs/c1.nii.gz"] or '
                '[{"image": ["./flair.nii.gz", "./t1.nii.gz"]}]'
            )
        resolved = [(path.parent / file).resolve() for file in files]
        cases.append(Case(image=resolved[0], other_modalities=tuple(resolved[1:])))
    if not cases:
        raise FedmedError(f"{path}: lists no cases under 'test', 'validation' or 'training'")
    return cases


def case_name(case: Case) -> str:
    name = case.image.name
    for suffix in NIFTI_SUFFIXES[::-1]:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return case.image.stem


def predict_cases(trained: TrainedModel, cases: Sequence[Case], *, out_dir: Path, device: Any) -> Iterator[CaseOutcome]:
    """Predict each case, write its output, yield its outcome; cases.csv (and predictions.csv) at the end."""
    config = trained.config
    out_dir = Path(out_dir)
    _refuse_site_intensity(trained)
    if problem := unwritable_reason(out_dir):  # before any case: finding out after the first is too late
        raise PredictOutputError(_cannot_write(out_dir, problem))
    predictor = Predictor(trained.build(device=device), config=config, device=device)
    names = _unique_names(cases)
    outcomes: list[CaseOutcome] = []
    try:
        for case, name in zip(cases, names, strict=True):
            outcomes.append(_predict_one(predictor, case, name=name, trained=trained, out_dir=out_dir))
            yield outcomes[-1]
    finally:
        try:
            _write_tables(out_dir, outcomes, trained=trained)
        except OSError as error:
            raise PredictOutputError(_cannot_write(out_dir, error.strerror or str(error))) from None


def _cannot_write(out_dir: Path, reason: str) -> str:
    return (
        f"{out_dir}: cannot write predictions there ({reason}); give --out a folder on a disk you can write to "
        "(not read-only, not full), or fix that folder's permissions"
    )


def _predict_one(predictor: Any, case: Case, *, name: str, trained: TrainedModel, out_dir: Path) -> CaseOutcome:
    kind = trained.config.task.kind
    image, problems = check_case_images(case, task=trained.config.task, entry=name)
    errors = [problem for problem in problems if problem.severity == "error"]
    if not errors and image is not None:
        errors = _channel_problems(image, case=case, trained=trained)
    if errors or image is None:
        return CaseOutcome(case=name, error="; ".join(map(str, errors)) or f"{name}: could not be read")
    try:
        prediction = predictor.predict(image, files=[str(path) for path in case.images])
    except Exception as error:  # one case's failure must not stop the others
        logger.debug("prediction of %s failed", name, exc_info=True)
        return CaseOutcome(case=name, error=f"{name}: prediction failed ({type(error).__name__}: {error})")
    if prediction.probabilities is not None:
        return CaseOutcome(case=name, probabilities=prediction.probabilities)
    target = out_dir / f"{name}_{OUTPUT_POSTFIX[kind]}.nii.gz"
    _write_like_source(target, prediction.volume, source=case.image, label=kind == "segmentation")
    return CaseOutcome(case=name, output=str(target))


def _unique_names(cases: Sequence[Case]) -> list[str]:
    names: list[str] = []
    for case in cases:
        name = base = case_name(case)
        number = 1
        while name in names:
            number += 1
            name = f"{base}-{number}"
        names.append(name)
    return names


def _refuse_site_intensity(trained: TrainedModel) -> None:
    mode = trained.config.task.intensity
    if mode not in (*PER_IMAGE_MODES, "ct_window"):
        raise FedmedError(
            f"{trained.description}: trained with task.intensity = '{mode}', which maps intensities with the "
            "training sites' own statistics; fedmed predict applies models trained with a per-image mode "
            "(zscore, percentile, minmax, ct_window, none)"
        )


def _channel_problems(image: Any, *, case: Case, trained: TrainedModel) -> list[Any]:
    expected = trained.config.task.channels
    found = int(image.shape[0])
    if found == expected:
        return []
    return [
        DataProblem(
            str(case.image),
            f"the case has {found} channel(s) but the model takes {expected} (one per modality it was trained on)",
            f"give the case's {expected} modality file(s) in the training order, e.g. a dataset.json entry "
            '{"image": ["./flair.nii.gz", "./t1.nii.gz"]}',
        )
    ]


def _write_like_source(path: Path, volume: Any, *, source: Path, label: bool) -> None:
    """The output on the source file's grid with its affine and header (one channel: a 3D or 2D volume;
    several: channels last, as 4D NIfTI stores them)."""
    reference = nibabel.load(str(source))
    array = np.asarray(volume.detach().cpu().numpy() if hasattr(volume, "detach") else volume)
    array = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)
    array = array.astype(np.uint8 if label else np.float32)
    header = reference.header.copy()
    header.set_data_dtype(array.dtype)
    image = nibabel.Nifti1Image(array, reference.affine, header=header)
    image.header.set_slope_inter(None if label else 1.0, None if label else 0.0)
    # Patient-derived: private like every file fedmed writes at a site; gzip without a timestamp so the
    # same prediction gives the same bytes.
    try:
        with atomic_path(path) as temporary:
            temporary.write_bytes(gzip.compress(image.to_bytes(), mtime=0))
    except OSError as error:  # the folder's fault, not the case's: every later case would fail the same way
        raise PredictOutputError(_cannot_write(path.parent, error.strerror or str(error))) from None


def _write_tables(out_dir: Path, outcomes: list[CaseOutcome], *, trained: TrainedModel) -> None:
    with atomic_path(out_dir / CASES_FILE) as temporary, temporary.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["case", "status", "output", "error"])
        for outcome in outcomes:
            writer.writerow([outcome.case, "ok" if outcome.ok else "failed", outcome.output, outcome.error])
    if trained.config.task.kind != "classification":
        return
    names = [trained.config.task.class_name(value) for value in range(trained.config.task.num_classes)]
    path = out_dir / PROBABILITIES_FILE
    with atomic_path(path) as temporary, temporary.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["case", "predicted", *[f"p_{name}" for name in names]])
        for outcome in outcomes:
            if outcome.probabilities is not None:
                best = int(np.argmax(outcome.probabilities))
                writer.writerow([outcome.case, names[best], *[f"{p:.6f}" for p in outcome.probabilities]])

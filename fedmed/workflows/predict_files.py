"""What `fedmed predict` writes: each case's NIfTI outputs on its source grid, and the tables naming every case
by its id with the input files it came from (cases.csv, predictions.csv)."""

from __future__ import annotations

import csv
import gzip
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel
import numpy as np

from fedmed.core.errors import FedmedError
from fedmed.core.files import atomic_path

CASES_FILE = "cases.csv"  # one row per case: its inputs, outputs, scores, or the reason it failed
PROBABILITIES_FILE = "predictions.csv"  # classification: one row of class probabilities per case
OUTPUT_POSTFIX = {"segmentation": "seg", "enhancement": "enhanced"}  # <case>_<postfix>.nii.gz, like MONAI's SaveImage
UNCERTAINTY_POSTFIX = "uncertainty"
SALIENCY_POSTFIX = "saliency"
INPUT_SEPARATOR = ";"
CASE_COLUMNS = (
    "case",
    "status",
    "inputs",
    "output",
    "uncertainty",
    "uncertainty_map",
    "ood_score",
    "ood_flag",
    "error",
)


class PredictOutputError(FedmedError):
    """The output folder cannot be written (read-only, full, or not ours)."""


@dataclass
class CaseOutcome:
    """One case of a prediction: where its outputs are, how sure the model was, or why it failed."""

    case: str
    inputs: list[str] = field(default_factory=list)
    output: str = ""
    error: str = ""
    probabilities: list[float] | None = None
    uncertainty: float | None = None
    uncertainty_map: str = ""
    ood_score: float | None = None
    ood_flagged: bool | None = None
    saliency: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


def cannot_write(out_dir: Path, reason: str) -> str:
    return (
        f"{out_dir}: cannot write predictions there ({reason}); give --out a folder on a disk you can write to "
        "(not read-only, not full), or fix that folder's permissions"
    )


def output_path(out_dir: Path, case_id: str, postfix: str, *, suffix: str = ".nii.gz") -> Path:
    return out_dir / f"{case_id}_{postfix}{suffix}"


def refuse_other_cases_under_same_ids(out_dir: Path, cases: Sequence[tuple[str, list[str]]]) -> None:
    """An earlier prediction in `out_dir` named a case alike but from other files: its outputs would be replaced
    by another patient's, so refuse before anything is written. The same case again is a rerun and is allowed."""
    earlier = read_case_inputs(out_dir / CASES_FILE)
    for case_id, inputs in cases:
        before = earlier.get(case_id)
        if before is not None and before != inputs:
            raise PredictOutputError(
                f"{out_dir}: already holds outputs of a case named '{case_id}' made from "
                f"{INPUT_SEPARATOR.join(before)}, not {INPUT_SEPARATOR.join(inputs)}; nothing was written. Give "
                "--out a new folder for these scans"
            )


def read_case_inputs(path: Path) -> dict[str, list[str]]:
    if not path.is_file():
        return {}
    try:
        with path.open(newline="", encoding="utf-8") as table:
            return {
                row["case"]: row["inputs"].split(INPUT_SEPARATOR)
                for row in csv.DictReader(table)
                if row.get("case") and row.get("inputs")
            }
    except (OSError, UnicodeDecodeError, csv.Error, KeyError):
        return {}  # not a table we wrote: it names no case of ours


def write_like_source(path: Path, volume: Any, *, source: Path, label: bool) -> None:
    """The output on the source file's grid with its affine and header (units included; one channel: a 3D or
    2D volume; several: channels last, as 4D NIfTI stores them)."""
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
        raise PredictOutputError(cannot_write(path.parent, error.strerror or str(error))) from None


def write_array(path: Path, array: np.ndarray) -> None:
    try:
        with atomic_path(path) as temporary, temporary.open("wb") as out:
            np.save(out, array.astype(np.float32))
    except OSError as error:
        raise PredictOutputError(cannot_write(path.parent, error.strerror or str(error))) from None


def write_tables(out_dir: Path, outcomes: Sequence[CaseOutcome], *, class_names: list[str] | None) -> None:
    """cases.csv (every case) and, for a classifier, predictions.csv. Rows an earlier prediction in the same folder
    wrote for other cases are kept: the table lists every output in the folder, and names each one's inputs."""
    current = {outcome.case for outcome in outcomes}
    earlier = _earlier_rows(out_dir / CASES_FILE, columns=CASE_COLUMNS, leave_out=current)
    with atomic_path(out_dir / CASES_FILE) as temporary, temporary.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(CASE_COLUMNS)
        writer.writerows(earlier)
        for outcome in outcomes:
            writer.writerow(
                [
                    outcome.case,
                    "ok" if outcome.ok else "failed",
                    INPUT_SEPARATOR.join(outcome.inputs),
                    outcome.output,
                    _number(outcome.uncertainty),
                    outcome.uncertainty_map,
                    _number(outcome.ood_score),
                    "" if outcome.ood_flagged is None else ("unlike-training-data" if outcome.ood_flagged else "ok"),
                    outcome.error,
                ]
            )
    if class_names is None:
        return
    columns = ("case", "predicted", *[f"p_{name}" for name in class_names], "uncertainty")
    earlier = _earlier_rows(out_dir / PROBABILITIES_FILE, columns=columns, leave_out=current)
    path = out_dir / PROBABILITIES_FILE
    with atomic_path(path) as temporary, temporary.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(columns)
        writer.writerows(earlier)
        for outcome in outcomes:
            if outcome.probabilities is not None:
                best = int(np.argmax(outcome.probabilities))
                probabilities = [f"{p:.6f}" for p in outcome.probabilities]
                writer.writerow([outcome.case, class_names[best], *probabilities, _number(outcome.uncertainty)])


def _earlier_rows(path: Path, *, columns: Sequence[str], leave_out: set[str]) -> list[list[str]]:
    """The rows of other cases in a table an earlier prediction wrote with the same columns."""
    if not path.is_file():
        return []
    try:
        with path.open(newline="", encoding="utf-8") as table:
            rows = list(csv.reader(table))
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
    if not rows or tuple(rows[0]) != tuple(columns):
        return []
    return [row for row in rows[1:] if row and row[0] not in leave_out]


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"

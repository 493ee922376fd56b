"""The per-case loop of an exported bundle, run by MONAI's own bundle runner (`scripts/runner.py` in the bundle).

It imports nothing of fedmed: `fedmed export` copies it into the bundle beside `scripts/case_layout.py`, whose
`find_cases` the bundle's config hands in, so plain MONAI finds and names cases exactly as `fedmed predict`
does. What it adds to MONAI's runner: the input layout's error as the first line the user reads (not under
"Failed to evaluate ConfigExpression"), a non-zero exit when no case was found or a case failed, one progress
line per case, every output named by its case id, and outputs written with the source file's header (its xyzt
units included, which MONAI's SaveImage drops). A bad case is reported and the others still complete.
"""

from __future__ import annotations

import csv
import gzip
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import nibabel
import numpy as np

# The tables `fedmed predict` writes, with the columns a bundle fills (no OOD score: that needs the run's card).
CASES_FILE = "cases.csv"  # one row per case: its id, status, input files, outputs and the reason it failed
CASE_COLUMNS = ("case", "status", "inputs", "output", "uncertainty", "uncertainty_map", "error")
PROBABILITIES_FILE = "predictions.csv"  # classification: one row of class probabilities per case
INPUT_SEPARATOR = ";"


def find_cases(
    inputs: str | Sequence[str] | Any,
    *,
    finder: Callable[..., Sequence[Any]],
    channels: int,
    channel_names: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """The datalist: one dict per case (`image`: its file, or its files in channel order, as LoadImaged reads
    them; `case_id`; `files`). A wrong layout or no case at all exits with the layout's own message."""
    # MONAI's command line (fire) turns a folder named like a number into one: every input is a path.
    paths = [Path(str(item)) for item in (inputs if isinstance(inputs, list | tuple) else [inputs])]
    try:
        cases = finder(paths, channels=channels, channel_names=list(channel_names) if channel_names else None)
    except (ValueError, OSError) as error:  # CaseLayoutError is a ValueError: it names the path and the fix
        raise SystemExit(f"fedmed bundle: {error}") from None
    return [
        {
            "image": str(case.images[0]) if len(case.images) == 1 else [str(path) for path in case.images],
            "case_id": case.case_id,
            "files": [str(path) for path in case.images],
        }
        for case in cases
    ]


def predict_cases(
    cases: Sequence[dict[str, Any]],
    *,
    predict: Callable[[dict[str, Any]], Any],
    output_dir: str,
    postfix: str,
    label: bool,
    channels: int,
    spatial_dims: int = 3,
) -> list[str]:
    """Each case through `predict` (its output on the case's own grid, channel first), written as
    `<case_id>_<postfix>.nii.gz` like its first input file. `predict` may return a dict: its "pred" is that output,
    its "score" the case's uncertainty score, and each other entry is written as `<case_id>_<name>.nii.gz` (the
    uncertainty map). Exits non-zero after the last case when any case failed."""
    out = _output_folder(output_dir, cases)
    rows: list[list[str]] = []
    for number, case in enumerate(cases, start=1):
        target = out / f"{case['case_id']}_{postfix}.nii.gz"
        try:
            _check_channels(case, channels=channels, spatial_dims=spatial_dims)
            outputs = predict(case)
            outputs = dict(outputs) if isinstance(outputs, dict) else {"pred": outputs}
            score = outputs.pop("score", None)  # one number per case (the uncertainty's), for cases.csv
            _write_like_source(target, outputs.pop("pred"), source=case["files"][0], label=label)
            extras = {name: out / f"{case['case_id']}_{name}.nii.gz" for name in outputs}
            for name, volume in outputs.items():
                _write_like_source(extras[name], volume, source=case["files"][0], label=False)
        except Exception as error:  # one case's failure must not stop the others
            rows.append(_failed(case, error, number=number, total=len(cases)))
            continue
        print(f"case {number}/{len(cases)} {case['case_id']} → {target}", flush=True)
        maps = INPUT_SEPARATOR.join(str(path) for path in extras.values())
        uncertainty = "" if score is None else f"{float(score):.6f}"
        rows.append([case["case_id"], "ok", _inputs(case), str(target), uncertainty, maps, ""])
    _write_cases(out, rows)
    return _finish(rows, out=out)


def classify_cases(
    cases: Sequence[dict[str, Any]],
    *,
    predict: Callable[[dict[str, Any]], Any],
    output_dir: str,
    class_names: Sequence[str],
    channels: int,
    spatial_dims: int = 3,
) -> list[str]:
    """Each case's class probabilities as one row of `predictions.csv` (case, predicted class, p_<class>...)."""
    out = _output_folder(output_dir, cases)
    rows: list[list[str]] = []
    probabilities: list[list[str]] = []
    for number, case in enumerate(cases, start=1):
        try:
            _check_channels(case, channels=channels, spatial_dims=spatial_dims)
            values = [float(p) for p in np.asarray(_plain(predict(case))).reshape(-1)]
        except Exception as error:  # one case's failure must not stop the others
            rows.append(_failed(case, error, number=number, total=len(cases)))
            continue
        best = class_names[int(np.argmax(values))]
        print(f"case {number}/{len(cases)} {case['case_id']} → {best} (p = {max(values):.3f})", flush=True)
        probabilities.append([case["case_id"], best, *[f"{p:.6f}" for p in values]])
        rows.append([case["case_id"], "ok", _inputs(case), str(out / PROBABILITIES_FILE), "", "", ""])
    header = ["case", "predicted", *[f"p_{name}" for name in class_names]]
    _write_csv(out / PROBABILITIES_FILE, header, probabilities)
    _write_cases(out, rows)
    return _finish(rows, out=out)


# Test-time augmentation (the config's `tta`): the passes `fedmed predict --uncertainty tta` makes, averaged on
# the model's grid; the uncertainty is the normalized entropy of the mean class probabilities (0 certain, 1 a
# coin toss), as fedmed.tasks.uncertainty defines it (a unit test holds the two together).
FOREGROUND_SUPPORT = 0.1


def averaged_probabilities(
    image: Any, *, inferer: Callable[..., Any], network: Any, augmentations: Sequence[dict[str, Any]] = ()
) -> Any:
    """The mean class probabilities of the plain pass and each augmented one (undone), on the model's grid."""
    import torch

    plain = image.as_tensor() if hasattr(image, "as_tensor") else image
    passes = [inferer(plain[None].float(), network)[0].float().cpu()]
    for augmentation in augmentations:
        output = inferer(_augment(plain, augmentation)[None].float(), network)[0].float().cpu()
        passes.append(_undo(output, augmentation))
    probabilities = [logits.softmax(dim=0) for logits in passes]
    return probabilities[0] if len(probabilities) == 1 else torch.stack(probabilities).mean(dim=0)


def labels_and_uncertainty(probabilities: Any, *, uncertainty: bool) -> Any:
    """The label map (argmax) of class probabilities on the scan's grid, and with `uncertainty` the per-voxel
    normalized entropy and the case's score (its mean over the voxels some class beside background gets
    probability above FOREGROUND_SUPPORT) beside it."""
    import torch

    plain = probabilities.as_tensor() if hasattr(probabilities, "as_tensor") else probabilities
    labels = plain.argmax(dim=0, keepdim=True).to(torch.uint8)
    if not uncertainty:
        return labels
    p = plain.float().clamp_min(1e-12)
    entropy = -(p * p.log()).sum(dim=0, keepdim=True) / math.log(plain.shape[0])
    support = (1.0 - plain[0]) > FOREGROUND_SUPPORT
    score = float(entropy[0][support].mean()) if bool(support.any()) else 0.0  # nothing found, consistently
    return {"pred": labels, "uncertainty": entropy, "score": score}


def _augment(tensor: Any, augmentation: dict[str, Any]) -> Any:
    import torch

    gain, shift, flip = augmentation.get("gain", 1.0), augmentation.get("shift") or [], augmentation.get("flip") or []
    if gain != 1.0:
        tensor = tensor * gain
    if any(shift):
        tensor = torch.roll(tensor, shifts=tuple(shift), dims=tuple(range(1, len(shift) + 1)))
    return torch.flip(tensor, dims=list(flip)) if flip else tensor


def _undo(output: Any, augmentation: dict[str, Any]) -> Any:
    import torch

    shift, flip = augmentation.get("shift") or [], augmentation.get("flip") or []
    if flip:
        output = torch.flip(output, dims=list(flip))
    if any(shift):
        output = torch.roll(output, shifts=tuple(-v for v in shift), dims=tuple(range(1, len(shift) + 1)))
    return output


def _output_folder(output_dir: str, cases: Sequence[dict[str, Any]]) -> Path:
    """The output folder, once no case in it would replace another patient's outputs of the same name."""
    out = Path(output_dir)
    earlier = {row[0]: row[2] for row in _earlier_rows(out / CASES_FILE)}
    for case in cases:
        before = earlier.get(case["case_id"])
        if before is not None and before != _inputs(case):
            raise SystemExit(
                f"fedmed bundle: {out}: already holds outputs of a case named '{case['case_id']}' made from {before}, "
                f"not {_inputs(case)}; nothing was written. Give --output_dir a new folder for these scans"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SystemExit(
            f"fedmed bundle: {out}: cannot be created ({error.strerror}); give --output_dir a folder you can write"
        ) from None
    return out


def _inputs(case: dict[str, Any]) -> str:
    return INPUT_SEPARATOR.join(str(Path(file).absolute()) for file in case["files"])


def _earlier_rows(path: Path) -> list[list[str]]:
    """Rows an earlier run wrote in the same folder (same columns), so the table names every output there."""
    try:
        with path.open(newline="", encoding="utf-8") as table:
            rows = list(csv.reader(table))
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
    if not rows or tuple(rows[0]) != CASE_COLUMNS:
        return []
    return [row for row in rows[1:] if len(row) == len(CASE_COLUMNS)]


def _write_cases(out: Path, rows: list[list[str]]) -> None:
    current = {row[0] for row in rows}
    earlier = [row for row in _earlier_rows(out / CASES_FILE) if row[0] not in current]
    _write_csv(out / CASES_FILE, list(CASE_COLUMNS), earlier + rows)


def _check_channels(case: dict[str, Any], *, channels: int, spatial_dims: int) -> None:
    """A case whose files hold more or fewer channels than the model takes, named before any voxel is read."""
    found = 0
    for file in case["files"]:
        shape = nibabel.load(file).shape
        found += int(np.prod(shape[spatial_dims:])) if len(shape) > spatial_dims else 1
    if found != channels:
        raise ValueError(
            f"its file(s) hold {found} channel(s) but the model takes {channels} (one per modality it was trained "
            f"on); give each case its {channels} modality file(s), e.g. one subject folder per case"
        )


def _failed(case: dict[str, Any], error: Exception, *, number: int, total: int) -> list[str]:
    reason = f"{type(error).__name__}: {error}" if not isinstance(error, ValueError) else str(error)
    print(f"case {number}/{total} {case['case_id']} failed: {reason}", file=sys.stderr, flush=True)
    return [case["case_id"], "failed", _inputs(case), "", "", "", reason]


def _finish(rows: list[list[str]], *, out: Path) -> list[str]:
    failed = [row[0] for row in rows if row[1] != "ok"]
    if failed:
        raise SystemExit(
            f"fedmed bundle: {len(rows) - len(failed)} of {len(rows)} case(s) predicted; failed: {', '.join(failed)} "
            f"(reasons in {out / CASES_FILE})"
        )
    print(f"{len(rows)} case(s) predicted into {out}", flush=True)
    return [row[3] for row in rows]


def _write_like_source(path: Path, volume: Any, *, source: str, label: bool) -> None:
    """The output on the source file's grid with its affine and header (units, codes, description), as
    `fedmed predict` writes it: one channel as a 3D (or 2D) volume, several channels last."""
    reference = nibabel.load(source)
    array = np.asarray(_plain(volume))
    array = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)
    array = array.astype(np.uint8 if label else np.float32)
    header = reference.header.copy()
    header.set_data_dtype(array.dtype)
    image = nibabel.Nifti1Image(array, reference.affine, header=header)
    image.header.set_slope_inter(None if label else 1.0, None if label else 0.0)
    # Written beside and renamed: an interrupted run leaves no half file under a case's name.
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(gzip.compress(image.to_bytes(), mtime=0))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        writer.writerows(rows)


def _plain(value: Any) -> Any:
    value = value.as_tensor() if hasattr(value, "as_tensor") else value
    return value.detach().cpu().numpy() if hasattr(value, "detach") else value

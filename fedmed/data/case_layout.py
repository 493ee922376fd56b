"""Which files make up each case of a prediction input, and the stable id each case is named by.

Inputs come as hospitals keep them: a folder of single-file cases, nnU-Net's `<case>_0000.nii.gz`
numbering, one folder per subject holding that subject's modalities under the same names as every other
subject's (BraTS: `<subject>/FLAIR.nii.gz`), or a Decathlon `dataset.json`. A case is named by its file
stem where stems are unique, else by its subject folder, else by both: never by position, so an output
can always be traced to its input.

This module imports nothing of fedmed: an exported bundle ships a copy (`scripts/case_layout.py`) so plain
MONAI finds and names cases exactly as `fedmed predict` does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

NIFTI_SUFFIXES = (".nii.gz", ".nii")
MANIFEST_NAME = "dataset.json"
MANIFEST_SPLITS = ("test", "validation", "training")
_NNUNET_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class CaseLayoutError(ValueError):
    """The input's layout does not give the model's cases; the message names the path and the fix."""


@dataclass(frozen=True)
class InputCase:
    """One case: its image files in the model's channel order, and the id its outputs are named by."""

    images: tuple[Path, ...]
    case_id: str
    subject_folder: bool = False  # the case is a folder of modality files (its id prefers the folder's name)


def is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def nifti_stem(path: Path) -> str:
    """The file name without .nii or .nii.gz."""
    for suffix in NIFTI_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def find_cases(inputs: Sequence[Path], *, channels: int, channel_names: Sequence[str] | None = None) -> list[InputCase]:
    """The cases in `inputs` (NIfTI files, folders of them, folders of subject folders, dataset.json files), each
    with its files ordered as the model's channels; raises CaseLayoutError when no case is found, a folder's files
    cannot be matched to the channels, or two cases would get the same id."""
    groups: list[tuple[tuple[Path, ...], bool]] = []
    for path in map(Path, inputs):
        groups += _cases_in(path, channels=channels, names=channel_names)
    if not groups:
        raise CaseLayoutError(
            f"{', '.join(map(str, inputs)) or 'the input'}: no cases found; give NIfTI files, a folder of them, a "
            f"folder of subject folders or a {MANIFEST_NAME}"
        )
    ids = case_ids([files for files, _ in groups], subject_folders=[folder for _, folder in groups])
    refuse_duplicate_ids(ids, [files for files, _ in groups])
    return [
        InputCase(images=files, case_id=case_id, subject_folder=folder)
        for (files, folder), case_id in zip(groups, ids, strict=True)
    ]


def case_ids(cases: Sequence[Sequence[Path]], *, subject_folders: Sequence[bool] | None = None) -> list[str]:
    """One id per case, unique within `cases` where the cases differ: the file stem (nnU-Net's `_0000` channel
    suffix dropped) where stems are unique, else the subject folder's name, else folder and stem, else the path
    from the cases' common folder. A subject-folder case tries its folder's name first."""
    firsts = [Path(files[0]) for files in cases]
    folders = list(subject_folders or [False] * len(firsts))
    stem: Callable[[Path], str] = lambda path: _case_stem(path)  # noqa: E731
    folder: Callable[[Path], str] = lambda path: path.parent.name  # noqa: E731
    both: Callable[[Path], str] = lambda path: f"{path.parent.name}-{_case_stem(path)}"  # noqa: E731
    for rules in ((stem, folder), (folder, stem), (both, both)):
        ids = [_safe(rules[1] if in_folder else rules[0])(path) for path, in_folder in zip(firsts, folders)]
        if all(ids) and len({i.lower() for i in ids}) == len(ids):  # lower: case-insensitive file systems
            return ids
    relative = [_safe(_relative_id)(path, firsts) for path in firsts]
    if len({i.lower() for i in relative}) == len(relative):
        return relative
    return [
        _safe(folder if in_folder else stem)(path) for path, in_folder in zip(firsts, folders)
    ]  # the same file twice


def refuse_duplicate_ids(ids: Sequence[str], cases: Sequence[Sequence[Path]]) -> None:
    """Two cases named alike would write one output file: refused before anything is written."""
    seen: dict[str, int] = {}
    for index, case_id in enumerate(ids):
        other = seen.setdefault(case_id.lower(), index)
        if other != index:
            raise CaseLayoutError(
                f"cases {_describe(cases[other])} and {_describe(cases[index])} would both write outputs named "
                f"'{case_id}'; nothing was written. Give each case once (the same file was given twice?) or "
                "rename one subject's folder"
            )


def _cases_in(path: Path, *, channels: int, names: Sequence[str] | None) -> list[tuple[tuple[Path, ...], bool]]:
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        path = path / MANIFEST_NAME
    if path.is_file() and path.name.endswith(".json"):
        return [(files, False) for files in manifest_cases(path)]
    if not path.is_dir():
        if path.exists() or is_nifti(path):  # a missing or mistyped file is reported with its case
            return [((path,), False)]
        raise CaseLayoutError(f"{path}: not found; give NIfTI files, a folder of them or a {MANIFEST_NAME}")
    files = sorted(p for p in path.iterdir() if is_nifti(p) and not p.name.startswith("."))
    if files:
        if channels == 1:
            return [((file,), False) for file in files]
        if all(_NNUNET_CHANNEL.match(nifti_stem(file)) for file in files):
            return [(group, False) for group in _nnunet_groups(path, files, channels=channels)]
        return [(match_channels(path, files, channels=channels, names=names), True)]
    subjects = sorted(p for p in path.iterdir() if p.is_dir() and any(is_nifti(f) for f in p.iterdir()))
    if not subjects:
        raise CaseLayoutError(
            f"{path}: no NIfTI files (.nii, .nii.gz), no subject folders holding them and no {MANIFEST_NAME}; "
            "point at the folder that holds the scans"
        )
    cases = []
    for subject in subjects:
        found = sorted(p for p in subject.iterdir() if is_nifti(p) and not p.name.startswith("."))
        if channels == 1 and len(found) == 1:
            cases.append(((found[0],), True))
        else:
            cases.append((match_channels(subject, found, channels=channels, names=names), True))
    return cases


def match_channels(
    folder: Path, files: Sequence[Path], *, channels: int, names: Sequence[str] | None
) -> tuple[Path, ...]:
    """A subject folder's files in channel order: by nnU-Net numbering, else by the channel names (a name matches
    a file whose name holds it as a word, e.g. FLAIR → `FLAIR.nii.gz`, `sub-01_flair.nii.gz`)."""
    numbered = {_channel_number(file): file for file in files}
    if None not in numbered and sorted(numbered) == list(range(channels)):
        return tuple(numbered[index] for index in range(channels))
    expected = f"{channels} channel(s) ({', '.join(names)})" if names else f"{channels} channel(s)"
    if not names or len(names) != channels:
        raise CaseLayoutError(
            f"{folder}: cannot tell which of its {len(files)} NIfTI file(s) is which of the model's {expected}; "
            "name them <case>_0000.nii.gz, <case>_0001.nii.gz ... in the model's channel order, or list the case "
            f'in a {MANIFEST_NAME}: {{"test": [{{"image": ["./flair.nii.gz", "./t1.nii.gz"]}}]}}'
        )
    ordered = []
    for name in names:
        matches = [file for file in files if _names_channel(file, name)]
        exact = [file for file in matches if _word(nifti_stem(file)) == _word(name)]
        matches = exact or matches
        if len(matches) != 1:
            found = ", ".join(file.name for file in files) or "no NIfTI files"
            what = "no file" if not matches else f"{len(matches)} files ({', '.join(m.name for m in matches)})"
            raise CaseLayoutError(
                f"{folder}: {what} for channel '{name}' of the model's {expected} (the folder holds {found}); "
                f"give each modality a file whose name holds its channel name once, e.g. {name}.nii.gz"
            )
        ordered.append(matches[0])
    return tuple(ordered)


def manifest_cases(path: Path) -> list[tuple[Path, ...]]:
    """A dataset.json's cases (test, then validation, then training), each its image files in channel order."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CaseLayoutError(f"{path}: cannot be read as JSON ({error}); fix the file") from None
    cases = []
    for entry in (entry for key in MANIFEST_SPLITS for entry in raw.get(key, [])):
        image = entry.get("image") if isinstance(entry, dict) else entry
        files = [image] if isinstance(image, str) else image
        if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
            raise CaseLayoutError(
                f'{path}: entry {entry!r} names no image; write cases as "test": ["./imagesTs/c1.nii.gz"] or '
                '[{"image": ["./flair.nii.gz", "./t1.nii.gz"]}]'
            )
        cases.append(tuple((path.parent / file).resolve() for file in files))
    if not cases:
        raise CaseLayoutError(f"{path}: lists no cases under {', '.join(repr(s) for s in MANIFEST_SPLITS)}")
    return cases


def _nnunet_groups(folder: Path, files: Sequence[Path], *, channels: int) -> list[tuple[Path, ...]]:
    by_case: dict[str, dict[int, Path]] = {}
    for file in files:
        match = _NNUNET_CHANNEL.match(nifti_stem(file))
        assert match is not None  # the caller checked every name
        by_case.setdefault(match["case"], {})[int(match["channel"])] = file
    groups = []
    for case, numbered in sorted(by_case.items()):
        if sorted(numbered) != list(range(channels)):
            raise CaseLayoutError(
                f"{folder}: case '{case}' has channel file(s) {sorted(numbered)} but the model takes {channels} "
                f"({', '.join(f'{case}_{i:04d}' for i in range(channels))}); add the missing modality or remove "
                "the case"
            )
        groups.append(tuple(numbered[index] for index in range(channels)))
    return groups


def _channel_number(file: Path) -> int | None:
    match = _NNUNET_CHANNEL.match(nifti_stem(file))
    return int(match["channel"]) if match else None


def _names_channel(file: Path, name: str) -> bool:
    stem = nifti_stem(file)
    return _word(name) in re.split(r"[^0-9a-z]+", stem.lower()) or _word(name) == _word(stem)


def _word(text: str) -> str:
    return re.sub(r"[^0-9a-z]", "", text.lower())


def _case_stem(path: Path) -> str:
    stem = nifti_stem(path)
    match = _NNUNET_CHANNEL.match(stem)
    return match["case"] if match else stem


def _relative_id(path: Path, everyone: Sequence[Path]) -> str:
    parents = [p.parent.resolve() for p in everyone]
    common = Path(*_common_prefix([p.parts for p in parents]))
    relative = path.parent.resolve().relative_to(common).parts or (path.parent.name,)
    return "-".join([*relative, _case_stem(path)])


def _common_prefix(parts: Sequence[tuple[str, ...]]) -> tuple[str, ...]:
    prefix: list[str] = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        prefix.append(level[0])
    return tuple(prefix) or ("/",)


def _safe(rule: Callable[..., str]) -> Callable[..., str]:
    return lambda *args: _UNSAFE.sub("_", rule(*args)).strip("._") or ""


def _describe(files: Sequence[Path]) -> str:
    return str(files[0]) if len(files) == 1 else f"({', '.join(map(str, files))})"

"""Plain helpers shared by the data-layer tests (imported as a module, not fixtures)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np

from fedmed.data.problems import DataProblem


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def blob_volume(shape: tuple[int, ...] = (12, 12, 12), *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A float32 image with a bright cube and its uint8 label."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, dtype=np.uint8)
    label[tuple(slice(size // 4, size // 2 + 1) for size in shape)] = 1
    image = (label * 2.0 + rng.normal(0.0, 0.1, size=shape)).astype(np.float32)
    return image, label


def find_problem(problems: list[DataProblem], *, path: Path | str, words: str) -> DataProblem:
    """The problem naming `path` whose message contains `words`; fails with every problem listed."""
    for problem in problems:
        if Path(problem.path).resolve() == Path(path).resolve() and words.lower() in problem.message.lower():
            assert problem.fix, f"problem has no fix: {problem}"
            assert f"Fix: {problem.fix}" in str(problem)
            return problem
    listed = "\n".join(f"  {problem.severity}: {problem}" for problem in problems)
    raise AssertionError(f"no problem on {path} mentioning '{words}'; got:\n{listed}")


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def fedmed_warnings() -> Iterator[list[str]]:
    """Warnings logged on the fedmed logger, whether or not it propagates to the root (caplog) logger."""
    handler = _ListHandler()
    logger = logging.getLogger("fedmed")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)

"""Data problems: each names the file, says what is wrong and how to fix it.

Kept apart from validation.py so that the manifest reader can report problems without importing the
validator (which imports the manifest reader).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedmed.core.errors import FedmedError

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class DataProblem:
    path: str
    message: str
    fix: str
    severity: Severity = "error"

    def __str__(self) -> str:
        return f"{self.path}: {self.message}. Fix: {self.fix}"


class DataValidationError(FedmedError):
    """A site's data cannot be used; `.problems` lists every problem found, not just the first."""

    def __init__(self, problems: list[DataProblem], *, context: str = "site data") -> None:
        self.problems = list(problems)
        errors = [problem for problem in self.problems if problem.severity == "error"]
        shown = errors or self.problems
        lines = "\n".join(f"  - {problem}" for problem in shown)
        super().__init__(f"{context}: {len(shown)} problem(s) found\n{lines}")


class DataOutputError(FedmedError):
    """A data-writing command would overwrite or mix with data it did not make."""


def errors_in(problems: list[DataProblem]) -> list[DataProblem]:
    return [problem for problem in problems if problem.severity == "error"]

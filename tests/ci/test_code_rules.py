"""The rules that keep the codebase carryable are checked in CI, and the checker catches what it should."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def _checker():
    spec = importlib.util.spec_from_file_location("check_code_size", REPO_ROOT / ".ci" / "check_code_size.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ci_runs_the_size_rules_and_the_strict_docs_build() -> None:
    script = (REPO_ROOT / ".ci" / "run").read_text()
    assert ".ci/check_code_size.py" in script
    assert "mkdocs build --strict" in script


def test_the_size_checker_names_a_long_module_and_a_long_function(tmp_path: Path) -> None:
    checker = _checker()
    (tmp_path / "fedmed").mkdir()
    (tmp_path / "experiments").mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(80))
    (tmp_path / "fedmed" / "long_function.py").write_text(f"def too_long():\n{body}\n")
    (tmp_path / "fedmed" / "fine.py").write_text("def short():\n    return 1\n")
    (tmp_path / "fedmed" / "long_module.py").write_text("x = 1\n" * 401)
    found = checker.offenders(tmp_path)
    assert found == [
        "fedmed/long_function.py:1 too_long: 81 lines (a function may have 80); split it",
        "fedmed/long_module.py: 401 lines (a module may have 400); split it",
    ]


def test_fedmed_keeps_the_size_rules() -> None:
    assert _checker().offenders(REPO_ROOT) == []

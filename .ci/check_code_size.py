"""Fail when a module of fedmed is over 400 lines or a function over 80: the size rules of CONTRIBUTING.

Run by `.ci/run` before the tests; prints every offender with its size and the rule it breaks.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
CHECKED = ("fedmed", "experiments")


def offenders(root: Path) -> list[str]:
    found: list[str] = []
    for folder in CHECKED:
        for path in sorted((root / folder).rglob("*.py")):
            source = path.read_text(encoding="utf-8")
            lines = source.count("\n") + (0 if source.endswith("\n") or not source else 1)
            relative = path.relative_to(root)
            if folder == "fedmed" and lines > MAX_MODULE_LINES:
                found.append(f"{relative}: {lines} lines (a module may have {MAX_MODULE_LINES}); split it")
            for node in ast.walk(ast.parse(source, filename=str(path))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    length = (node.end_lineno or node.lineno) - node.lineno + 1
                    if length > MAX_FUNCTION_LINES:
                        found.append(
                            f"{relative}:{node.lineno} {node.name}: {length} lines "
                            f"(a function may have {MAX_FUNCTION_LINES}); split it"
                        )
    return found


def main() -> int:
    found = offenders(Path(__file__).resolve().parents[1])
    for line in found:
        print(line)
    if found:
        print(f"{len(found)} size rule(s) broken", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())

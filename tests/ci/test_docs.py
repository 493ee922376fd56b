"""The documentation's rules, checked without building the site (CI's strict `mkdocs build` checks links and
references): the README stays a front door, every page is reachable, every benchmark table names the commit and
the command that produced it, and the docs' hook flags a table made before the defaults changed."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCS = REPO_ROOT / "docs"
TABLES = DOCS / "benchmarks" / "tables"
README_MAX_LINES = 250
# .ci/run runs the README's test command, and a newcomer copies its install + demo line: both stay as they are.
README_COMMANDS = [
    "python3.11 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/fedmed demo",
    'python3.11 -m venv .venv && .venv/bin/pip install -e ".[test]" && .venv/bin/python -m pytest',
]
NOT_PAGES = ("hooks/", "benchmarks/tables/")  # mkdocs.yml's exclude_docs


def _load(path: Path) -> ModuleType:
    name = f"_docs_rules_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def _nav_pages() -> set[str]:
    # The nav's entries are the only `.md` values after `nav:` (no YAML parser needed, nor installed by `[test]`).
    config = (REPO_ROOT / "mkdocs.yml").read_text()
    nav = config[config.index("\nnav:") :]
    return set(re.findall(r"([\w./-]+\.md)\s*$", nav, re.MULTILINE))


def _table_files() -> list[Path]:
    return sorted(TABLES.glob("*.md"))


def test_the_readme_is_a_front_door_that_keeps_its_two_commands() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES, f"README.md: over {README_MAX_LINES} lines; move it to docs/"
    for command in README_COMMANDS:
        assert command in readme.splitlines(), f"README.md no longer gives the command line: {command}"


def test_every_page_is_in_the_nav_and_every_nav_entry_exists() -> None:
    pages = {
        path.relative_to(DOCS).as_posix()
        for path in DOCS.rglob("*.md")
        if not path.relative_to(DOCS).as_posix().startswith(NOT_PAGES)
    }
    nav = _nav_pages()
    assert not pages - nav, f"pages missing from mkdocs.yml's nav: {sorted(pages - nav)}"
    assert not nav - pages, f"mkdocs.yml's nav names pages that do not exist: {sorted(nav - pages)}"


def test_every_benchmark_table_is_stamped_with_a_commit_and_a_command_that_exists() -> None:
    tables = _load(REPO_ROOT / "experiments" / "benchmark_tables.py")
    assert _table_files(), f"no benchmark tables in {TABLES}"
    for path in _table_files():
        stamp = tables.read_stamp(path.read_text())
        where = path.relative_to(REPO_ROOT)
        assert stamp.get("name") == path.stem, f"{where}: the stamp's name is not the file's ({stamp.get('name')})"
        assert re.fullmatch(r"[0-9a-f]{7,40}", stamp.get("commit", "")), f"{where}: no commit in its stamp"
        scripts = re.findall(r"\bpython3? (experiments/\S+\.py)", stamp.get("command", ""))
        assert scripts, f"{where}: its stamp's command names no script in experiments/: {stamp.get('command')}"
        assert (REPO_ROOT / scripts[0]).is_file(), f"{where}: its command's script {scripts[0]} does not exist"


def test_every_benchmark_of_the_script_has_its_table_and_every_table_is_shown() -> None:
    tables = _load(REPO_ROOT / "experiments" / "benchmark_tables.py")
    for benchmark in tables.BENCHMARKS:
        assert benchmark.output.is_file(), f"{benchmark.name}: no table; `{tables.rerun_command(benchmark.name)}`"
        stamp = tables.read_stamp(benchmark.output.read_text())
        assert stamp["rerun"] == tables.rerun_command(benchmark.name), f"{benchmark.output}: rerun is not the script's"
    pages = "\n".join(path.read_text() for path in (DOCS / "benchmarks").glob("*.md"))
    included = set(re.findall(r'--8<--\s+"docs/benchmarks/tables/([\w.-]+)\.md"', pages))
    shown = {path.stem for path in _table_files()}
    assert shown <= included, f"tables no page includes: {sorted(shown - included)}"
    assert included <= shown, f"pages include tables that do not exist: {sorted(included - shown)}"


def test_a_written_table_reads_back_with_its_stamp() -> None:
    tables = _load(REPO_ROOT / "experiments" / "benchmark_tables.py")
    stamp = {field: f"value of {field}" for field in tables.STAMP_FIELDS} | {"rerun": "python x.py"}
    text = tables.render_table_file(stamp, tables.tables_in("caption\n| a | b |\n| --- | --- |\n| 1 | 2 |\nafter"))
    assert tables.read_stamp(text) == stamp
    assert "caption\n\n| a | b |\n| --- | --- |\n| 1 | 2 |" in text and "after" not in text
    assert "```text\nplain output\n```" in tables.tables_in("plain output\n")


def test_the_docs_extra_pins_what_the_strict_build_needs() -> None:
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    docs = " ".join(extras.get("docs", []))
    for package in ("mkdocs==", "mkdocs-material==", "mkdocstrings", "mkdocstrings-python=="):
        assert package in docs, f"pyproject.toml's docs extra does not pin {package.rstrip('=')}"


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, check=True).stdout


@pytest.fixture
def hook() -> ModuleType:
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout: the hook has nothing to compare")
    return _load(DOCS / "hooks" / "benchmark_stamps.py")


def test_the_hook_warns_above_a_table_made_before_the_defaults_changed(hook: ModuleType) -> None:
    changed = _git("log", "-1", "--format=%h", "--", hook.DEFAULTS).strip()
    if not changed or not _git("rev-parse", "--verify", "--quiet", f"{changed}^").strip():
        pytest.skip("no commit changed the defaults after another commit (a shallow clone?)")
    before = _git("rev-parse", "--short", f"{changed}^").strip()
    warning = hook.staleness_warning({"commit": before, "rerun": "python experiments/benchmark_tables.py x"}, REPO_ROOT)
    assert warning.startswith("!!! warning") and f"`{changed}`" in warning, warning
    assert "`python experiments/benchmark_tables.py x`" in warning
    head = _git("rev-parse", "--short", "HEAD").strip()
    assert hook.staleness_warning({"commit": head, "rerun": "python x.py"}, REPO_ROOT) == ""
    assert hook.staleness_warning({"commit": "0000000", "rerun": "python x.py"}, REPO_ROOT) == ""  # unknown: silent


def test_the_hook_puts_the_warning_above_the_included_table(
    hook: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = tmp_path / "docs" / "benchmarks" / "tables" / "t.md"
    table.parent.mkdir(parents=True)
    table.write_text("<!-- benchmark-stamp\nname: t\ncommit: 0123abc\nrerun: python r.py\n-->\n\n| a |\n| --- |\n")
    page = 'Intro.\n\n--8<-- "docs/benchmarks/tables/t.md"\n\nAfter.\n'
    # Not a git checkout: git cannot tell, so the page stays as it was.
    assert hook.with_warnings(page, tmp_path) == page
    monkeypatch.setattr(hook, "changes_since", lambda commit, repo: ("fedcba9",))
    warned = hook.with_warnings(page, tmp_path)
    assert warned.index("!!! warning") < warned.index("--8<--") and "`fedcba9`" in warned and "`python r.py`" in warned


def test_the_script_writes_what_a_command_printed_under_a_stamp_of_this_checkout(
    hook: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tables = _load(REPO_ROOT / "experiments" / "benchmark_tables.py")
    monkeypatch.setattr(tables, "TABLES_DIR", tmp_path)
    printed = "print('noise'); print('Caption:'); print('| a |'); print('| --- |'); print('| 1 |')"
    assert tables.run(tables.Benchmark("tiny", ("-c", printed)))
    text = (tmp_path / "tiny.md").read_text()
    stamp = tables.read_stamp(text)
    assert stamp["commit"] == _git("rev-parse", "--short", "HEAD").strip()
    assert stamp["command"].startswith("python -c") and stamp["rerun"] == tables.rerun_command("tiny")
    assert text.endswith("\n\nCaption:\n\n| a |\n| --- |\n| 1 |\n") and "\nnoise\n" not in text
    assert not tables.run(tables.Benchmark("tiny", ("-c", "raise SystemExit(3)")))
    assert (tmp_path / "tiny.md").read_text() == text  # a failed command leaves the table as it was

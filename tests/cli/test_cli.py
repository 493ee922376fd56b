"""The command line: help everywhere, clean errors, and the researcher's commands end to end."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from fedmed.cli.main import app

runner = CliRunner()


def _command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for name, command in group.commands.items():
        paths.append((*prefix, name))
        if isinstance(command, click.Group):
            paths += _command_paths(command, (*prefix, name))
    return paths


COMMANDS = _command_paths(typer.main.get_command(app))


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_every_command_has_help(path: tuple[str, ...]) -> None:
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and len(result.output.splitlines()) > 3


def test_expected_commands_exist() -> None:
    assert {("demo",), ("simulate",), ("synth",), ("report",), ("site", "check")} <= set(COMMANDS)


SYNTH = """
[synth]
task = "segmentation"
spatial_dims = 2
image_size = [32, 32]
train_cases = 3
val_cases = 2
[[synth.sites]]
name = "one"
[[synth.sites]]
name = "two"
noise_std = 0.05
"""


def test_synth_then_site_check(tmp_path: Path) -> None:
    config = tmp_path / "synth.toml"
    config.write_text(SYNTH)
    result = runner.invoke(app, ["synth", str(config), str(tmp_path / "fed")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "fed" / "two" / "dataset.json").exists()

    good = runner.invoke(app, ["site", "check", str(tmp_path / "fed" / "one")])
    assert good.exit_code == 0 and "OK" in good.output

    victim = sorted((tmp_path / "fed" / "two" / "labelsTr").iterdir())[0]
    victim.write_bytes(b"not a nifti")
    bad = runner.invoke(app, ["site", "check", str(tmp_path / "fed" / "two")])
    assert bad.exit_code == 1
    assert str(victim) in bad.output and "Fix:" in bad.output


def test_simulate_and_report(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(
        'name = "cli"\n[task]\nkind = "segmentation"\nimage_size = [32, 32]\n[model]\nchannels = [8, 16]\n'
        "[train]\nrounds = 1\n[baselines]\nlocal_only = true\n" + SYNTH
    )
    result = runner.invoke(app, ["simulate", str(config)])
    assert result.exit_code == 0, result.output
    assert "local-only dice" in result.output and "worst site" in result.output
    run_dir = next((tmp_path / "runs").glob("cli-*"))
    assert json.loads((run_dir / "summary.json").read_text())["primary_metric"] == "dice"

    (run_dir / "report.html").unlink()
    again = runner.invoke(app, ["report", str(run_dir)])
    assert again.exit_code == 0 and (run_dir / "report.html").exists()


def test_config_errors_are_one_clean_message(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text('[task]\nkind = "segmentaton"\n')
    result = runner.invoke(app, ["simulate", str(config)])
    assert result.exit_code == 2
    assert "run.toml: invalid configuration" in result.output and "'task.kind'" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", [["simulate", "run.toml"], ["run", "run.toml"]])
def test_readmit_without_resume_is_refused_with_the_fix(command: list[str], tmp_path) -> None:
    (tmp_path / "run.toml").write_text('name = "r"\n[task]\nkind = "segmentation"\n')
    result = runner.invoke(app, [*command[:1], str(tmp_path / command[1]), "--readmit", "site-a"])
    assert result.exit_code == 2
    assert "--readmit" in result.output and "--resume RUN_DIR" in result.output

"""Bad input ends with one message naming the file or key and the fix, exit code 2, and no stub run folder;
Ctrl-C leaves a run that `fedmed simulate --resume` continues."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedmed.cli.main import app
from fedmed.models import memory

runner = CliRunner()

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
"""
RUN = 'name = "bad"\n[task]\nkind = "segmentation"\nimage_size = [32, 32]\n[model]\nchannels = [8, 16]\n'
# A PNG's first bytes: enough for a sniffer (and for every reader to choke on it later).
PNG_BYTES = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(64)


def _clean_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output


def _runs(folder: Path) -> list[Path]:
    return [path for path in folder.glob("*") if path.name != "data"] if folder.exists() else []


@pytest.mark.parametrize(
    ("data", "section"),
    [('[[sites]]\nname = "one"\npath = "data/one"\n', "[[sites]]"), (SYNTH, "[synth]")],
    ids=["sites", "synth"],
)
def test_run_refuses_a_simulation_config_before_contacting_anything(tmp_path: Path, data: str, section: str) -> None:
    config = tmp_path / "sim.toml"
    config.write_text(RUN + data)
    # No server.toml exists: the refusal comes first, so nothing could have been contacted.
    result = runner.invoke(app, ["run", str(config), "--server", str(tmp_path / "missing" / "server.toml")])
    _clean_error(result, str(config), f"{section} describe a simulation's data", "fedmed simulate")


def test_simulate_refuses_an_absurd_size_up_front(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Pinned so the test means the same on every machine; the estimate itself is the real one.
    monkeypatch.setattr(memory, "available_memory", lambda config: (16 * 2**30, "available RAM"))
    config = tmp_path / "huge.toml"
    config.write_text(RUN.replace("[32, 32]", "[4096, 4096]") + SYNTH)
    result = runner.invoke(app, ["simulate", str(config)])
    _clean_error(result, str(config), "task.image_size = [4096, 4096]", "16.0 GiB of available RAM", "Lower")
    assert _runs(tmp_path / "runs") == [], "refused before any data or run folder was written"


def test_a_small_config_is_far_below_the_estimate_limit() -> None:
    from fedmed.config import RunConfig

    config = RunConfig.model_validate({"name": "small", "task": {"kind": "segmentation", "image_size": [32, 32]}})
    estimate = memory.estimate_training_memory(config)
    assert estimate is not None and 0 < estimate.bytes < 64 * 2**20
    big = config.model_copy(update={"task": config.task.model_copy(update={"image_size": [64, 64]})})
    assert memory.estimate_training_memory(big).activations_per_case == 4 * estimate.activations_per_case


def test_simulate_checks_the_output_folder_first(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    config = tmp_path / "run.toml"
    config.write_text(f'output_dir = "{blocker / "runs"}"\n' + RUN + SYNTH)
    result = runner.invoke(app, ["simulate", str(config)])
    _clean_error(result, f"output_dir {blocker / 'runs'}", "set output_dir to a folder you can write")


def test_a_png_named_nii_gz_is_called_a_png(tmp_path: Path) -> None:
    config = tmp_path / "synth.toml"
    config.write_text(SYNTH)
    assert runner.invoke(app, ["synth", str(config), str(tmp_path / "fed")]).exit_code == 0
    victim = sorted((tmp_path / "fed" / "two" / "labelsTr").iterdir())[0]
    victim.write_bytes(PNG_BYTES)
    result = runner.invoke(app, ["site", "check", str(tmp_path / "fed" / "two")])
    assert result.exit_code == 1
    assert "not a NIfTI file (looks like PNG)" in result.output and "affine" not in result.output

    run = tmp_path / "run.toml"
    run.write_text(
        RUN + f'[[sites]]\nname = "one"\npath = "{tmp_path / "fed" / "one"}"\n'
        f'[[sites]]\nname = "two"\npath = "{tmp_path / "fed" / "two"}"\n'
    )
    simulated = runner.invoke(app, ["simulate", str(run)])
    _clean_error(simulated, str(victim), "looks like PNG")
    assert _runs(tmp_path / "runs") == [], "a data fault leaves no stub run folder"


def test_ctrl_c_marks_the_run_interrupted_and_resume_finishes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedmed.runs.progress import RoundProgress

    report = RoundProgress.report

    def interrupt_after_round_one(self, server_round: int, **kwargs) -> None:
        report(self, server_round, **kwargs)
        if server_round == 1:
            raise KeyboardInterrupt

    config = tmp_path / "run.toml"
    config.write_text(RUN + "[train]\nrounds = 2\n[evaluation]\ncross_site = false\n" + SYNTH)
    with monkeypatch.context() as patch:
        patch.setattr(RoundProgress, "report", interrupt_after_round_one)
        stopped = runner.invoke(app, ["simulate", str(config)])
    (run_dir,) = _runs(tmp_path / "runs")
    _clean_error(stopped, "interrupted after round 1", f"fedmed simulate --resume {run_dir}")
    assert json.loads((run_dir / "status.json").read_text())["state"] == "interrupted"

    resumed = runner.invoke(app, ["simulate", "--resume", str(run_dir)])
    assert resumed.exit_code == 0, resumed.output
    rounds = [json.loads(line)["round"] for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert rounds == [1, 2]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = [(row["round"], row["site"], row["phase"]) for row in rows]
    assert len(keys) == len(set(keys)), "no duplicate metric rows"
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"
    assert (run_dir / "summary.json").exists() and (run_dir / "report.html").exists()

    finished = runner.invoke(app, ["simulate", "--resume", str(run_dir)])
    _clean_error(finished, "this run finished")

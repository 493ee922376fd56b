"""Bad input ends with one message naming the file or key and the fix, exit code 2, and no stub run folder;
Ctrl-C leaves a run that `fedmed simulate --resume` continues."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner
from unwritable import full_folder, read_only_folder

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


# A trained model's bad input: damaged files, folders that refuse writes, empty images ----------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-round federation of two 2D sites: a model to predict with and export."""
    from fedmed.config import load_run_config
    from fedmed.workflows.simulate import simulate

    root = tmp_path_factory.mktemp("trained")
    config = root / "run.toml"
    config.write_text(RUN + "[train]\nrounds = 1\n[evaluation]\ncross_site = false\n" + SYNTH)
    return simulate(load_run_config(config)).run_dir.path


def _an_image(run_dir: Path) -> Path:
    return sorted((run_dir.parent / "data").glob("*/one/imagesTr/*.nii.gz"))[0]


def _model_command(command: str, run_dir: Path, out: Path, *, image: Path) -> list[str]:
    if command == "predict":
        return ["predict", str(run_dir), str(image), "--out", str(out)]
    return ["export", str(run_dir), "--out", str(out)]


@pytest.mark.parametrize("command", ["predict", "export"])
def test_a_truncated_checkpoint_is_named_with_the_fix(trained_run: Path, tmp_path: Path, command: str) -> None:
    run_dir = tmp_path / trained_run.name
    shutil.copytree(trained_run, run_dir)
    final = run_dir / "checkpoints" / "final.pt"
    final.write_bytes(final.read_bytes()[: final.stat().st_size // 2])  # a copy cut short
    result = runner.invoke(app, _model_command(command, run_dir, tmp_path / "out", image=_an_image(trained_run)))
    _clean_error(result, str(final), "cannot be read as a model checkpoint", "copy it again")
    assert not (tmp_path / "out").exists(), "nothing written for a model that could not be read"


def test_a_bundle_with_damaged_metadata_is_named_with_the_fix(trained_run: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    assert runner.invoke(app, ["export", str(trained_run), "--out", str(bundle)]).exit_code == 0
    metadata = bundle / "configs" / "metadata.json"
    metadata.write_text(metadata.read_text()[:40])  # cut short
    result = runner.invoke(
        app, ["predict", str(bundle), str(_an_image(trained_run)), "--out", str(tmp_path / "predictions")]
    )
    _clean_error(result, str(metadata), "unreadable", "copy the bundle again")
    assert not (tmp_path / "predictions").exists()


@pytest.mark.parametrize("command", ["predict", "export"])
@pytest.mark.parametrize("inside", [False, True], ids=["out-is-it", "out-below-it"])
def test_an_out_folder_that_refuses_writes_is_named_with_the_fix(
    trained_run: Path, tmp_path: Path, command: str, inside: bool
) -> None:
    with read_only_folder(tmp_path / "read-only") as folder:
        out = folder / "out" if inside else folder
        result = runner.invoke(app, _model_command(command, trained_run, out, image=_an_image(trained_run)))
        _clean_error(result, f"{out}: cannot write", "give --out a", "not read-only")
        assert list(folder.iterdir()) == []


def test_export_onto_a_full_disk_leaves_no_half_bundle(trained_run: Path, tmp_path: Path) -> None:
    # 20 KiB: the folders and the first files fit, the weights and scripts do not.
    with full_folder(tmp_path / "small", size_kib=20) as folder:
        result = runner.invoke(app, ["export", str(trained_run), "--out", str(folder / "bundle")])
        _clean_error(result, f"{folder / 'bundle'}: cannot write the export there", "not full")
        assert list(folder.iterdir()) == [], "a failed export leaves nothing behind"


def _empty_image(path: Path) -> Path:
    import nibabel as nib
    import numpy as np

    nib.save(nib.Nifti1Image(np.zeros((0, 64), np.float32), np.eye(4)), str(path))
    return path


def test_site_check_names_an_empty_image(trained_run: Path, tmp_path: Path) -> None:
    site = tmp_path / "one"
    shutil.copytree(_an_image(trained_run).parent.parent, site)
    victim = _empty_image(sorted((site / "imagesTr").iterdir())[0])
    result = runner.invoke(app, ["site", "check", str(site)])
    # Like every data problem site check finds: listed in its report, exit code 1.
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert f"{victim}: image file holds no voxels (shape (0, 64))" in result.output and "re-export" in result.output


def test_predict_names_an_empty_image_and_still_predicts_the_others(trained_run: Path, tmp_path: Path) -> None:
    empty = _empty_image(tmp_path / "empty.nii.gz")
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["predict", str(trained_run), str(empty), str(_an_image(trained_run)), "--out", str(out)]
    )
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "1 of 2 case(s) predicted" in result.output
    rows = (out / "cases.csv").read_text().splitlines()
    assert (
        rows[1].startswith(f"empty,failed,{empty},,")
        and "holds no voxels (shape (0, 64))" in rows[1]
        and "re-export" in rows[1]
    )
    assert rows[2].split(",")[1] == "ok"

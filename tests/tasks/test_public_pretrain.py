"""Public pre-training: [pretrain] public and `fedmed pretrain --public` train the run's network on a data set the
coordinator holds, record which one (name, cases, digest), re-train when it changes and refuse a resume whose
starting point moved."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedmed.cli.main import app
from fedmed.config import RunConfig, SynthConfig, load_run_config, run_config_from_dict
from fedmed.core.errors import ConfigError, FedmedError
from fedmed.data import synthesize_federation
from fedmed.flower.server.start import INIT_DIGEST, check_resumed_start, global_start, record_start
from fedmed.models import starting_model
from fedmed.runs import RunDirectory
from fedmed.runs.outputs import write_outputs
from fedmed.runs.run_dir import PRETRAIN_DIR
from fedmed.runs.summary import format_summary
from fedmed.tasks import start_weights
from fedmed.tasks.public_pretrain import public_data_sha256, public_pretrain
from fedmed.workflows.bundle_docs import handover_config, starting_point

SIZE = [32, 32]


@pytest.fixture(scope="module")
def atlas(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small public data set in site format (real NIfTI files): 12 training and 4 validation cases."""
    synth = SynthConfig(
        task="segmentation", image_size=SIZE, train_cases=12, val_cases=4, seed=42, sites=[{"name": "atlas"}]
    )
    (entry,) = synthesize_federation(synth, tmp_path_factory.mktemp("public"))
    return entry.path


def _config(tmp_path: Path, **pretrain: Any) -> RunConfig:
    raw = {
        "name": "tiny",
        "seed": 3,
        "output_dir": str(tmp_path / "runs"),
        "task": {"kind": "segmentation", "image_size": SIZE},
        "model": {"channels": [8, 16]},
        "train": {"batch_size": 4, "learning_rate": 0.003},
        "synth": {"task": "segmentation", "image_size": SIZE, "train_cases": 4, "val_cases": 3, "seed": 1},
        "pretrain": {"epochs": 3, **pretrain},
    }
    raw["synth"]["sites"] = [{"name": "site-a"}, {"name": "site-b"}]
    return run_config_from_dict(raw, base=tmp_path)


def _copy(atlas: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(atlas, tmp_path / "atlas"))


def test_public_pretraining_records_the_data_set_reuses_its_cache_and_retrains_when_it_changes(
    atlas: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    public = _copy(atlas, tmp_path)
    config = _config(tmp_path, public=str(public))
    assert config.pretrain.enabled, "public implies pretraining"
    folder = tmp_path / "pretrain"
    weights, record = start_weights.pretrained_start(config, folder=folder)

    assert record["kind"] == "public pretraining"
    assert (record["data_set"], record["data_path"], record["cases"], record["val_cases"]) == (
        "atlas",
        str(public),
        12,
        4,
    )
    assert record["data_sha256"] == public_data_sha256(public) and record["validation"] == "its own validation split"
    digest = hashlib.sha256((folder / "pretrained.pt").read_bytes()).hexdigest()
    assert record["sha256"] == weights.sha256 == digest and record["file"] == str(folder / "pretrained.pt")
    assert record["metric"] == "dice" and record["value"] > record["random_value"], record
    assert json.loads((folder / "pretrain.json").read_text())["data_sha256"] == record["data_sha256"]

    # The same data: the cache, no training.
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(start_weights, "public_pretrain", refuse)
    assert start_weights.pretrained_start(config, folder=folder)[1] == record

    # One label file changes (other voxels): the data's digest changes and the pretraining is made again.
    label_file = public / "labelsTr" / "atlas_003.nii.gz"
    image = nib.load(label_file)
    label = np.asarray(image.dataobj)
    nib.save(nib.Nifti1Image(np.flip(label, axis=0).copy(), image.affine, image.header), label_file)
    calls: list[Path] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[0].pretrain.public)
        return public_pretrain(*args, **kwargs)

    monkeypatch.setattr(start_weights, "public_pretrain", counted)
    _, again = start_weights.pretrained_start(config, folder=folder)
    assert calls == [public] and again["data_sha256"] != record["data_sha256"]
    assert again["data_sha256"] == public_data_sha256(public)


def test_an_msd_dataset_json_without_validation_holds_every_fifth_case_out(atlas: Path, tmp_path: Path) -> None:
    public = _copy(atlas, tmp_path)
    manifest = public / "dataset.json"
    raw = json.loads(manifest.read_text())
    raw = {key: value for key, value in raw.items() if key not in ("validation", "numValidation", "fedmed")}
    raw.update(name="Atlas", training=raw["training"] + json.loads((atlas / "dataset.json").read_text())["validation"])
    raw["numTraining"] = 16
    manifest.write_text(json.dumps(raw))
    before = manifest.read_bytes()

    result = public_pretrain(_config(tmp_path), public=manifest, epochs=1)  # the dataset.json itself
    assert (result.public["data_set"], result.cases, result.val_cases) == ("Atlas", 13, 3)
    assert result.public["validation"] == "every 5th training case held out (3)"
    assert manifest.read_bytes() == before, "the public data set is never written to"
    assert result.describe()["kind"] == "public pretraining" and "scanners" not in result.describe()


def test_a_resume_refuses_a_changed_public_start(atlas: Path, tmp_path: Path) -> None:
    public = _copy(atlas, tmp_path)
    config = _config(tmp_path, public=str(public), epochs=1)
    run = RunDirectory(tmp_path / "run")
    run.path.mkdir()
    start = global_start(config, run_dir=run)
    assert start.kind == "public pretraining"
    fields = record_start(run, start)  # what the ServerApp does before round 1
    checkpoint = {INIT_DIGEST: fields[INIT_DIGEST]}
    check_resumed_start(checkpoint, global_start(config, run_dir=run), run_dir=run)  # unchanged: resumes

    # The summary, the report and an exported bundle's provenance name the data set, its cases and digests.
    summary = write_outputs(run, primary_metric="dice", higher_is_better=True)
    recorded = summary["start"]
    assert recorded["kind"] == "public pretraining" and recorded["data_set"] == "atlas" and recorded["cases"] == 12
    assert "started from public pretraining on atlas: 12 cases × 1 epoch(s)" in format_summary(summary)
    page = run.report_html.read_text()
    assert "Started from public pretraining on atlas" in page and recorded["data_sha256"][:16] in page
    provenance = starting_point(SimpleNamespace(run_dir=run, provenance={}))
    assert provenance == {key: recorded[key] for key in provenance} and "data_path" not in provenance
    assert provenance["sha256"] == fields[INIT_DIGEST] and provenance["val_cases"] == 4
    assert handover_config(config).pretrain.public is None, "a bundle never names the coordinator's folders"

    # The cached weights swapped for others (record and all): refused.
    weights_file, record_file = run.path / PRETRAIN_DIR / "pretrained.pt", run.path / PRETRAIN_DIR / "pretrain.json"
    original = weights_file.read_bytes()
    state = torch.load(weights_file, weights_only=True)
    swapped = {key: value + 1 if value.is_floating_point() else value for key, value in state.items()}
    record = json.loads(record_file.read_text())
    record["sha256"] = start_weights.save_weights(swapped, weights_file)
    record_file.write_text(json.dumps(record))
    with pytest.raises(FedmedError, match=r"has changed since the run started.*restore the original weights file"):
        check_resumed_start(checkpoint, global_start(config, run_dir=run), run_dir=run)

    # The public data changed: trained on again, and the resume says which data set to restore.
    weights_file.write_bytes(original)
    (public / "imagesTr" / "atlas_000.nii.gz").unlink()
    shutil.copy(public / "imagesTr" / "atlas_001.nii.gz", public / "imagesTr" / "atlas_000.nii.gz")
    with pytest.raises(FedmedError, match=r"public data set 'atlas' at .* changed since .*restore the data set"):
        check_resumed_start(checkpoint, global_start(config, run_dir=run), run_dir=run)


def test_bad_public_settings_name_the_field_and_the_fix(atlas: Path, tmp_path: Path) -> None:
    config_file = tmp_path / "run.toml"
    text = (
        'name = "tiny"\n[task]\nkind = "segmentation"\nimage_size = [32, 32]\n[synth]\ntask = "segmentation"\n'
        'image_size = [32, 32]\n[[synth.sites]]\nname = "a"\n[pretrain]\npublic = "data/atlas"\n'
    )
    config_file.write_text(text)
    config = load_run_config(config_file)
    assert config.pretrain.public == tmp_path / "data" / "atlas" and config.pretrain.enabled
    with pytest.raises(ConfigError, match=r"pretrain\.public: .*data/atlas not found; fedmed never downloads"):
        public_pretrain(config)
    with pytest.raises(ConfigError, match=r"pretrain\.public: .* not found"):
        start_weights.pretrained_start(config, folder=tmp_path / "pre")

    config_file.write_text(text + "enabled = false\n")
    with pytest.raises(ConfigError, match=r"pretrain\.enabled = false but pretrain\.public .*remove pretrain\.enabled"):
        load_run_config(config_file)
    config_file.write_text(text + "cases = 8\n")
    with pytest.raises(ConfigError, match=r"pretrain\.cases describe synthetic phantoms.*remove pretrain\.cases"):
        load_run_config(config_file)
    config_file.write_text(text + '[model]\ninit = "w.pt"\n')
    with pytest.raises(ConfigError, match=r"pretrain\.public and model\.init both set the run's starting weights"):
        load_run_config(config_file)

    # A site's own folder is not public data.
    config_file.write_text(text.split("[synth]")[0] + f'[[sites]]\nname = "a"\npath = "{atlas}"\n')
    with pytest.raises(ConfigError, match=r"is site 'a''s data: the public data set must be one no site holds"):
        public_pretrain(load_run_config(config_file), public=atlas / "dataset.json")


def test_fedmed_pretrain_public_writes_weights_model_init_loads(atlas: Path, tmp_path: Path) -> None:
    config_file = tmp_path / "run.toml"
    config_file.write_text(
        'name = "tiny"\n[task]\nkind = "segmentation"\nimage_size = [32, 32]\n[model]\nchannels = [8, 16]\n'
        '[train]\nbatch_size = 4\n[[sites]]\nname = "a"\npath = "a"\n'
    )
    out = tmp_path / "weights" / "start.pt"
    runner = CliRunner()
    result = runner.invoke(
        app, ["pretrain", str(config_file), "--public", str(atlas), "--out", str(out), "--epochs", "1"]
    )
    assert result.exit_code == 0, result.output
    assert (
        "validation cases (random init" in result.output and "public data set atlas: 12 training cases" in result.output
    )
    assert f"data: {atlas}  (sha256 {public_data_sha256(atlas)[:16]}" in result.output
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert f"weights: {out}  (sha256 {digest[:16]}" in result.output
    config = load_run_config(config_file, overrides=[f"model.init={out}"])
    started = starting_model(config.task, config.model)  # strict: every key and shape fits the run's network
    assert started.init is not None and started.init.sha256 == digest

    refused = runner.invoke(app, ["pretrain", str(config_file), "--public", str(atlas), "--cases", "8"])
    assert refused.exit_code != 0 and "--cases counts synthetic phantoms" in refused.output

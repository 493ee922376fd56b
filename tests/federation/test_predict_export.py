"""Apply and hand over a trained model: `fedmed predict` on new files, `fedmed export` to a MONAI bundle that
MONAI's own runner applies in a virtual environment without fedmed, and TorchScript."""

from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scan_sites import simulate_scan_run
from typer.testing import CliRunner

from fedmed.cli.main import app
from fedmed.config import load_run_config, run_config_from_dict
from fedmed.workflows.bundle_docs import monai_command
from fedmed.workflows.export import write_bundle, write_torchscript
from fedmed.workflows.predict import PredictOptions, input_cases, predict_cases
from fedmed.workflows.simulate import simulate
from fedmed.workflows.trained_model import ModelSourceError, load_trained_model

CPU = torch.device("cpu")
# CI builds this interpreter's environment with only torch, monai[fire] and nibabel (see .ci/run).
BUNDLE_PYTHON = os.environ.get("FEDMED_BUNDLE_PYTHON")


@pytest.fixture(scope="module")
def scan_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-round federation of two-modality volumes at native spacing (scan geometry)."""
    return simulate_scan_run(tmp_path_factory.mktemp("scan-run"), name="scan")


def _grid_config(root: Path, **changes: object) -> dict:
    """A one-round 2D fixed-grid segmentation federation; site-c stores half-resolution images."""
    return {
        "name": "grid",
        "seed": 0,
        "output_dir": str(root / "runs"),
        "task": {"kind": "segmentation", "spatial_dims": 2, "image_size": [32, 32]},
        "model": {"channels": [8, 16]},
        "train": {"rounds": 1, "batch_size": 4},
        "evaluation": {"finetune_epochs": 1},
        "synth": {
            "task": "segmentation",
            "spatial_dims": 2,
            "image_size": [32, 32],
            "train_cases": 4,
            "val_cases": 2,
            "seed": 1,
            "sites": [{"name": "site-a"}, {"name": "site-c", "downsample": 2, "gamma": 1.3}],
        },
        **changes,
    }


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("grid-run")
    return simulate(run_config_from_dict(_grid_config(root), base=root)).run_dir.path


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same federation fine-tuned with DP-SGD through low-rank adapters (merged into the weights each round)."""
    root = tmp_path_factory.mktemp("adapter-run")
    raw = _grid_config(
        root,
        dp_sgd={"enabled": True, "trainable": "adapters", "noise_multiplier": 2.0, "accountant": "rdp"},
        evaluation={"finetune_epochs": 0},
    )
    return simulate(run_config_from_dict(raw, base=root)).run_dir.path


def _site_manifest(run_dir: Path, site: str) -> Path:
    (manifest,) = (run_dir.parent / "data").glob(f"*/{site}/dataset.json")
    return manifest


def _validation_files(manifest: Path) -> list[list[Path]]:
    entries = json.loads(manifest.read_text())["validation"]
    images = [entry["image"] if isinstance(entry["image"], list) else [entry["image"]] for entry in entries]
    return [[(manifest.parent / path).resolve() for path in files] for files in images]


def _array(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def _assert_on_grid_of(written: Path, source: Path) -> None:
    out, src = nib.load(str(written)), nib.load(str(source))
    assert out.shape == src.shape[:3] if len(src.shape) > 3 else out.shape == src.shape
    np.testing.assert_allclose(out.affine, src.affine, atol=1e-5)


def _dice(prediction: np.ndarray, truth: np.ndarray, *, num_classes: int) -> float:
    scores = []
    for value in range(1, num_classes):
        a, b = prediction == value, truth == value
        if a.any() or b.any():
            scores.append(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))
    return float(np.mean(scores))


@pytest.mark.slow
def test_predict_scan_geometry_lands_on_each_source_grid_and_reproduces_the_reported_dice(
    scan_run: Path, tmp_path: Path
) -> None:
    manifest = _site_manifest_scan(scan_run, "site-b")  # stored LPS at 0.8 x 0.8 x 2 mm, trained at 1.2 mm
    out = tmp_path / "predicted"
    trained = load_trained_model(scan_run)
    outcomes = list(predict_cases(trained, input_cases([manifest], task=trained.config.task), out_dir=out, device=CPU))
    assert all(outcome.ok for outcome in outcomes), [outcome.error for outcome in outcomes]
    rows = {  # by the case's first image file (the case column holds its id)
        Path(row["images"].split(";")[0]).name: row
        for row in csv.DictReader((scan_run / "sites" / "site-b" / "evaluation" / "global-cases.csv").open())
    }
    entries = json.loads(manifest.read_text())["validation"]
    for entry in entries:
        flair = manifest.parent / entry["image"][0]
        written = out / f"{flair.name.removesuffix('.nii.gz')}_seg.nii.gz"
        _assert_on_grid_of(written, flair)
        truth = _array(manifest.parent / entry["label"])
        assert _dice(_array(written), truth, num_classes=3) == pytest.approx(float(rows[flair.name]["dice"]), abs=1e-5)


def _site_manifest_scan(run_dir: Path, site: str) -> Path:
    (entry,) = [entry for entry in load_run_config(run_dir / "config.toml").sites if entry.name == site]
    return Path(entry.path) / "dataset.json"


@pytest.mark.slow
def test_bad_cases_are_reported_with_the_fix_and_the_others_complete(scan_run: Path, tmp_path: Path) -> None:
    manifest = _site_manifest_scan(scan_run, "site-a")
    good = _validation_files(manifest)[0]
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(gzip.compress(b"not a nifti at all"))
    listing = tmp_path / "dataset.json"
    listing.write_text(
        json.dumps(
            {
                "test": [
                    [str(path) for path in good],
                    [str(good[1])],  # one modality of the two the model takes
                    [str(corrupt), str(good[1])],
                    [str(tmp_path / "missing.nii.gz"), str(good[1])],
                ]
            }
        )
    )
    runner = CliRunner()
    result = runner.invoke(app, ["predict", str(scan_run), str(listing), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    assert "1 of 4 case(s) predicted" in result.output
    rows = list(csv.DictReader((tmp_path / "out" / "cases.csv").open()))
    assert [row["status"] for row in rows] == ["ok", "failed", "failed", "failed"]
    assert "has 1 channel(s) but the model takes 2" in rows[1]["error"]
    assert "corrupt" in rows[2]["error"] and "re-export or re-copy the file" in rows[2]["error"]
    assert "not found" in rows[3]["error"]
    assert Path(rows[0]["output"]).is_file()
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == sorted(["cases.csv", "report.html", Path(rows[0]["output"]).name])


def test_fixed_grid_prediction_goes_back_to_the_stored_grid(grid_run: Path, tmp_path: Path) -> None:
    manifest = _site_manifest(grid_run, "site-c")  # half-resolution images: the model grid is larger
    files = [paths[0] for paths in _validation_files(manifest)]
    trained = load_trained_model(grid_run)
    outcomes = list(predict_cases(trained, input_cases(files, task=trained.config.task), out_dir=tmp_path, device=CPU))
    assert all(outcome.ok for outcome in outcomes)
    for source in files:
        written = tmp_path / f"{source.name.removesuffix('.nii.gz')}_seg.nii.gz"
        _assert_on_grid_of(written, source)
        assert _array(written).dtype == np.uint8 and set(np.unique(_array(written))) <= {0, 1}


def test_a_sites_personalized_model_is_applied_without_the_coordinator(grid_run: Path, tmp_path: Path) -> None:
    global_model = load_trained_model(grid_run)
    personal = load_trained_model(grid_run, site="site-a")
    assert personal.site == "site-a" and "delivered" in personal.description
    # Fine-tuned at the site (evaluation.finetune_epochs = 1): it delivers whichever of its fine-tuned model and the
    # global one scored better on its tuning split.
    chosen = json.loads((grid_run / "summary.json").read_text())["sites"]["site-a"]["delivered_model"]
    personalized = torch.load(grid_run / "sites" / "site-a" / "personalized_model.pt", weights_only=True)
    expected = personalized if chosen == "personalized" else global_model.state_dict
    assert all(torch.equal(personal.state_dict[key], expected[key]) for key in expected)
    # The site's own folder holds the model and the run's config: enough for predict on its own.
    site_folder = load_trained_model(grid_run / "sites" / "site-a")
    assert site_folder.state_dict.keys() == personal.state_dict.keys()
    with pytest.raises(ModelSourceError, match="no personalized model for site 'site-x'"):
        load_trained_model(grid_run, site="site-x")


def test_a_damaged_delivered_model_is_named_with_the_fix(grid_run: Path, tmp_path: Path) -> None:
    folder = tmp_path / "site-a"
    shutil.copytree(grid_run / "sites" / "site-a", folder)
    delivered = folder / "delivered_model.pt"
    delivered.write_bytes(delivered.read_bytes()[:100])  # a disk that filled up mid-write
    with pytest.raises(ModelSourceError, match=r"delivered_model.pt: cannot be read .*move it aside"):
        load_trained_model(folder)
    delivered.unlink()
    assert "personalized" in load_trained_model(folder).description


class _Payload:
    def __reduce__(self) -> tuple:
        return (os.system, ("touch pwned",))


def test_model_files_are_read_as_tensors_only(grid_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelSourceError, match="not a model checkpoint"):
        load_trained_model(grid_run / "checkpoints" / "latest.pt")
    hostile = tmp_path / "run" / "checkpoints" / "final.pt"
    hostile.parent.mkdir(parents=True)
    (tmp_path / "run" / "config.toml").write_bytes((grid_run / "config.toml").read_bytes())
    torch.save({"state_dict": _Payload()}, hostile)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelSourceError, match="not a model checkpoint"):
        load_trained_model(hostile)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_torchscript_export_gives_the_models_output(grid_run: Path, tmp_path: Path) -> None:
    trained = load_trained_model(grid_run)
    path = write_torchscript(trained, path=tmp_path / "model.ts")
    loaded = torch.jit.load(str(path), _extra_files={"fedmed.json": ""})
    image = torch.randn(2, 1, 48, 48)
    torch.testing.assert_close(loaded(image), trained.build(device=CPU)(image))


def _bundle_python() -> str:
    if BUNDLE_PYTHON is None:
        if os.environ.get("FEDMED_REQUIRE_BUNDLE_PYTHON"):
            pytest.fail("FEDMED_BUNDLE_PYTHON is not set; .ci/run builds that environment")
        pytest.skip(
            "set FEDMED_BUNDLE_PYTHON to a Python with only torch, monai[fire] and nibabel (.ci/run builds one)"
        )
    return BUNDLE_PYTHON


def _monai_run(bundle: Path, *, images: Path, out: Path, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """MONAI's documented command, as the bundle's README gives it, from a folder that is not the bundle's."""
    python = _bundle_python()
    probe = subprocess.run([python, "-c", "import fedmed"], cwd=bundle, capture_output=True)
    assert probe.returncode != 0, "the bundle's environment must not have fedmed"
    words = {"IN": str(images), "OUT": str(out)}
    command = [words.get(word, word) for word in monai_command(str(bundle)).split()]
    assert command[:4] == ["python", "-m", "monai.bundle", "run"]
    return subprocess.run(
        [python, *command[1:], *extra],
        cwd=out.parent,
        capture_output=True,
        text=True,
        timeout=600,
        env=_without_pythonpath(),
    )


def _without_pythonpath() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


def _run_bundle(bundle: Path, *, images: Path, out: Path, extra: tuple[str, ...] = ()) -> str:
    done = _monai_run(bundle, images=images, out=out, extra=extra)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "optional_packages_version" not in done.stderr  # MONAI warns on deprecated metadata keys
    return done.stdout


def _brats_subjects(run_dir: Path, images: Path) -> list[list[Path]]:
    """Site-b's validation cases as BraTS keeps them: one folder per subject, every subject's files named alike
    (the source files' headers with their units set, so the outputs must carry them)."""
    subjects = []
    for number, paths in enumerate(_validation_files(_site_manifest_scan(run_dir, "site-b"))):
        folder = images / f"subject-{number}"
        folder.mkdir(parents=True)
        written = []
        for path, name in zip(paths, ("FLAIR", "T1"), strict=True):
            source = nib.load(str(path))
            image = nib.Nifti1Image(np.asarray(source.dataobj), source.affine)
            image.header.set_xyzt_units("mm", "sec")
            nib.save(image, str(folder / f"{name}.nii.gz"))
            written.append(folder / f"{name}.nii.gz")
        subjects.append(written)
    return subjects


@pytest.mark.slow
@pytest.mark.parametrize("run_name", ["scan_run", "grid_run", "adapter_run"])
def test_monai_runs_the_exported_bundle_without_fedmed_and_agrees_with_predict(
    run_name: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    run_dir: Path = request.getfixturevalue(run_name)
    trained = load_trained_model(run_dir)
    bundle = write_bundle(trained, out_dir=tmp_path / "bundle")
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert metadata["fedmed"]["run_id"] == run_dir.name and metadata["fedmed"]["rounds"] == 1
    assert metadata["fedmed"]["sites"] and "path" not in (bundle / "configs" / "fedmed_run.toml").read_text()
    reloaded = load_trained_model(bundle)  # fedmed predict and [model] init take the bundle too
    assert all(torch.equal(reloaded.state_dict[key], value) for key, value in trained.state_dict.items())
    assert reloaded.config.task == trained.config.task
    images = tmp_path / "images"
    images.mkdir()
    if run_name == "scan_run":
        subjects = _brats_subjects(run_dir, images)
        expected = [f"subject-{number}_seg.nii.gz" for number in range(len(subjects))]
    else:
        for paths in _validation_files(_site_manifest(run_dir, "site-c")):
            (images / paths[0].name).write_bytes(paths[0].read_bytes())
        expected = sorted(f"{p.name.removesuffix('.nii.gz')}_seg.nii.gz" for p in images.iterdir())
    predicted = tmp_path / "predicted"
    cases = input_cases([images], task=trained.config.task)
    outcomes = list(predict_cases(trained, cases, out_dir=predicted, device=CPU))
    assert all(outcome.ok for outcome in outcomes), [outcome.error for outcome in outcomes]
    assert [Path(outcome.output).name for outcome in outcomes] == expected

    printed = _run_bundle(bundle, images=images, out=tmp_path / "bundle-out")

    out = tmp_path / "bundle-out"
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".nii.gz")) == expected  # none overwrote another
    for number, name in enumerate(expected, start=1):
        assert (
            f"case {number}/{len(expected)} {name.removesuffix('_seg.nii.gz')} → {out / name}" in printed.splitlines()
        )
    for outcome in outcomes:
        ours, theirs = Path(outcome.output), out / Path(outcome.output).name
        np.testing.assert_allclose(nib.load(str(theirs)).affine, nib.load(str(ours)).affine, atol=1e-5)
        np.testing.assert_array_equal(_array(theirs).reshape(_array(ours).shape), _array(ours))
        if run_name == "scan_run":
            assert nib.load(str(theirs)).header.get_xyzt_units() == ("mm", "sec")
    rows = {row["case"]: row for row in csv.DictReader((out / "cases.csv").open())}
    assert {case.case_id: ";".join(map(str, case.images)) for case in cases} == {
        case: row["inputs"] for case, row in rows.items()
    }


@pytest.mark.slow
def test_the_bundles_tta_option_writes_the_uncertainty_map_predict_writes(scan_run: Path, tmp_path: Path) -> None:
    trained = load_trained_model(scan_run)
    bundle = write_bundle(trained, out_dir=tmp_path / "bundle")
    images = tmp_path / "images"
    _brats_subjects(scan_run, images)
    cases = input_cases([images], task=trained.config.task)
    options = PredictOptions(uncertainty="tta", report=False)
    outcomes = list(predict_cases(trained, cases, out_dir=tmp_path / "predicted", device=CPU, options=options))
    assert all(outcome.ok and outcome.uncertainty_map for outcome in outcomes), [o.error for o in outcomes]

    _run_bundle(bundle, images=images, out=tmp_path / "bundle-out", extra=("--tta", "True"))

    rows = {row["case"]: row for row in csv.DictReader((tmp_path / "bundle-out" / "cases.csv").open())}
    sources = {case.case_id: nib.load(str(case.images[0])) for case in cases}
    for outcome in outcomes:
        theirs = tmp_path / "bundle-out" / Path(outcome.uncertainty_map).name
        assert rows[outcome.case]["uncertainty_map"] == str(theirs)
        source = sources[outcome.case]
        assert nib.load(str(theirs)).shape == source.shape and nib.load(str(theirs)).header.get_xyzt_units()[0] == "mm"
        np.testing.assert_allclose(_array(theirs), _array(Path(outcome.uncertainty_map)), atol=1e-4)
        assert float(rows[outcome.case]["uncertainty"]) == pytest.approx(outcome.uncertainty, abs=1e-4)
        ours_labels = _array(Path(outcome.output))
        assert np.mean(_array(theirs.with_name(Path(outcome.output).name)) == ours_labels) > 0.999


@pytest.mark.slow
def test_the_bundle_says_what_goes_in(scan_run: Path, tmp_path: Path) -> None:
    # The simulation took the channel names from the sites' dataset.json ("modality": FLAIR, T1).
    assert load_run_config(scan_run / "config.toml").task.channel_names == ["FLAIR", "T1"]
    bundle = write_bundle(load_trained_model(scan_run), out_dir=tmp_path / "bundle")
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    image = metadata["network_data_format"]["inputs"]["image"]
    assert image["channel_def"] == {"0": "FLAIR", "1": "T1"} and image["modality"] == "MR"
    assert image["spatial_shape"] == ["*", "*", "*"] and image["is_patch_data"] is False
    assert "segmentation (oedema, core) of MR images (FLAIR, T1)" in metadata["intended_use"]
    use = metadata["intended_use_details"]
    assert use["input_channels"] == ["FLAIR", "T1"] and use["labels"] == {"1": "oedema", "2": "core"}
    assert use["trained_spacing_mm"] == [1.2, 1.2, 1.2] and use["trained_orientation"] == "RAS"
    assert use["patch_size"] == [16, 16, 16]
    assert "optional_packages_version" not in metadata and "nibabel" in metadata["required_packages_version"]
    readme = (bundle / "README.md").read_text()
    assert monai_command() in readme and '"monai[fire]==' in readme and "FLAIR.nii.gz, T1.nii.gz" in readme
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    assert inference["channel_names"] == ["FLAIR", "T1"]


@pytest.mark.slow
def test_the_bundle_stops_on_a_wrong_layout_or_an_empty_folder_with_the_reason(scan_run: Path, tmp_path: Path) -> None:
    bundle = write_bundle(load_trained_model(scan_run), out_dir=tmp_path / "bundle")
    empty = tmp_path / "empty"
    empty.mkdir()
    done = _monai_run(bundle, images=empty, out=tmp_path / "out-empty")
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith(f"fedmed bundle: {empty}: no NIfTI files")
    # One case's folder whose files do not name the model's channels (FLAIR, T1): the finder's reason, first.
    one_case = tmp_path / "one-case"
    one_case.mkdir()
    for name in ("scan_a.nii.gz", "scan_b.nii.gz"):
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), str(one_case / name))
    done = _monai_run(bundle, images=one_case, out=tmp_path / "out-layout")
    assert done.returncode != 0 and "Failed to evaluate" not in done.stderr
    assert "no file for channel 'FLAIR'" in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out-layout").exists()


def _strings(value: object) -> list[str]:
    if isinstance(value, dict):
        return [text for item in value.values() for text in _strings(item)]
    if isinstance(value, list):
        return [text for item in value for text in _strings(item)]
    return [value] if isinstance(value, str) else []


@pytest.mark.parametrize("site", [None, "site-a"], ids=["global", "site-model"])
def test_the_bundle_names_no_data_or_run_folder(grid_run: Path, tmp_path: Path, site: str | None) -> None:
    import tomllib

    bundle = write_bundle(load_trained_model(grid_run, site=site), out_dir=tmp_path / "bundle")
    config = load_run_config(grid_run / "config.toml")
    data = sorted({str(entry.path) for entry in config.sites} | {str(grid_run.parent / "data")})
    # Every folder the training touched: the sites' data, the run directory, and the folder above both.
    forbidden = [*data, str(grid_run), str(grid_run.parent), str(grid_run.parent.parent)]
    assert len(data) >= 3 and all(Path(path).is_absolute() for path in forbidden)
    texts = {
        path.relative_to(bundle): path.read_text(encoding="utf-8")
        for path in bundle.rglob("*")
        if path.is_file() and path.suffix != ".pt"
    }
    assert {Path("configs/metadata.json"), Path("configs/inference.json"), Path("configs/fedmed_run.toml")} <= set(
        texts
    )
    for name, text in texts.items():
        assert not [path for path in forbidden if path in text], f"{name} names a folder of the training"
    for name in ("configs/metadata.json", "configs/inference.json"):
        values = _strings(json.loads(texts[Path(name)]))
        assert not [text for text in values if text.startswith(("/", "~")) or ":\\" in text], name
    handed = tomllib.loads(texts[Path("configs/fedmed_run.toml")])
    assert handed["sites"] == [] and "synth" not in handed and not Path(handed["output_dir"]).is_absolute()
    metadata = json.loads(texts[Path("configs/metadata.json")])
    assert metadata["fedmed"]["run_id"] == grid_run.name and metadata["fedmed"]["sites"] == ["site-a", "site-c"]


def test_input_cases_read_files_folders_and_manifests(grid_run: Path, tmp_path: Path) -> None:
    task = load_trained_model(grid_run).config.task
    manifest = _site_manifest(grid_run, "site-a")
    from_manifest = input_cases([manifest], task=task)
    assert len(from_manifest) == 6 and all(len(case.images) == 1 for case in from_manifest)
    assert len(input_cases([manifest.parent / "imagesTr"], task=task)) == len(
        list((manifest.parent / "imagesTr").glob("*.nii.gz"))
    )
    with pytest.raises(Exception, match="no NIfTI files"):
        input_cases([tmp_path], task=task)


@pytest.mark.parametrize("kind", ["classification", "enhancement"])
def test_classification_and_enhancement_outputs(kind: str, tiny_config, tmp_path: Path) -> None:
    config = tiny_config(kind=kind, train={"rounds": 1}, evaluation={"cross_site": False})
    run_dir = simulate(config).run_dir.path
    manifest = _site_manifest(run_dir, "site-c")
    files = [paths[0] for paths in _validation_files(manifest)]
    out = tmp_path / "out"
    trained = load_trained_model(run_dir)
    outcomes = list(predict_cases(trained, input_cases(files, task=trained.config.task), out_dir=out, device=CPU))
    assert all(outcome.ok for outcome in outcomes), [outcome.error for outcome in outcomes]
    if kind == "classification":
        rows = list(csv.DictReader((out / "predictions.csv").open()))
        assert [row["case"] for row in rows] == [source.name.removesuffix(".nii.gz") for source in files]
        for row in rows:
            probabilities = [float(row[key]) for key in row if key.startswith("p_")]
            assert len(probabilities) == 2 and sum(probabilities) == pytest.approx(1.0, abs=1e-5)
        bundle = write_bundle(trained, out_dir=tmp_path / "bundle")
        images = tmp_path / "images"
        images.mkdir()
        for source in files:
            (images / source.name).write_bytes(source.read_bytes())
        _run_bundle(bundle, images=images, out=tmp_path / "bundle-out")
        theirs = list(csv.DictReader((tmp_path / "bundle-out" / "predictions.csv").open()))
        assert [row["case"] for row in theirs] == [row["case"] for row in rows]
        for ours, their in zip(rows, theirs, strict=True):
            for key in their:
                if key.startswith("p_"):
                    assert float(their[key]) == pytest.approx(float(ours[key]), abs=1e-5)
            assert their["predicted"] == ours["predicted"]
    else:
        for source in files:
            written = out / f"{source.name.removesuffix('.nii.gz')}_enhanced.nii.gz"
            _assert_on_grid_of(written, source)
            restored, original = _array(written), np.asarray(nib.load(str(source)).dataobj, dtype=np.float32)
            # Back in the scanner's units: the restored image spans the input's intensity range, not [0, 1].
            assert restored.dtype == np.float32 and np.corrcoef(restored.ravel(), original.ravel())[0, 1] > 0.5
            assert abs(float(restored.mean()) - float(original.mean())) < 0.25 * float(original.std()) + 1e-3

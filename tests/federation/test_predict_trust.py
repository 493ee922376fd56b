"""`fedmed predict` names every output by its case, never overwrites one, and says how sure it is: BraTS-style
subject folders, collisions refused before writing, uncertainty maps on each source grid, the OOD score from the
run's model card, and the report."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scan_sites import simulate_scan_run
from typer.testing import CliRunner

from fedmed.cli.main import app
from fedmed.core.errors import FedmedError
from fedmed.workflows.export import write_bundle
from fedmed.workflows.predict import PredictOptions, input_cases, predict_cases
from fedmed.workflows.simulate import simulate
from fedmed.workflows.trained_model import ensemble_members, load_trained_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def scan_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One round of two-modality (FLAIR, T1) volumes at native spacing; the sites' dataset.json name the modalities."""
    return simulate_scan_run(tmp_path_factory.mktemp("trust-run"), name="trust")


@pytest.fixture
def subjects(scan_run: Path, tmp_path: Path) -> Path:
    """Two BraTS-style subject folders whose files are named alike (FLAIR.nii.gz, T1.nii.gz) plus a label."""
    images = scan_run.parent.parent / "site-b" / "images"
    folder = tmp_path / "subjects"
    for number, subject in enumerate(("patient-1", "patient-2")):
        (folder / subject).mkdir(parents=True)
        for modality, name in (("flair", "FLAIR"), ("t1", "T1"), ("label", "GT")):
            shutil.copy(images / f"site-b_{number}_{modality}.nii.gz", folder / subject / f"{name}.nii.gz")
    return folder


def _predict(run: Path, inputs: list[Path], out: Path, **options: object) -> list:
    trained = load_trained_model(run, ensemble=options.get("uncertainty") == "ensemble")
    cases = input_cases(inputs, task=trained.config.task)
    return list(predict_cases(trained, cases, out_dir=out, device=CPU, options=PredictOptions(**options)))


def _grid(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    image = nib.load(str(path))
    return image.shape, image.affine


def test_subjects_with_identical_file_names_get_one_output_each_named_by_subject(
    scan_run: Path, subjects: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    outcomes = _predict(scan_run, [subjects], out)
    assert [outcome.case for outcome in outcomes] == ["patient-1", "patient-2"]
    assert all(outcome.ok for outcome in outcomes), [outcome.error for outcome in outcomes]
    first, second = (np.asarray(nib.load(str(out / f"{s}_seg.nii.gz")).dataobj) for s in ("patient-1", "patient-2"))
    assert not np.array_equal(first, second)  # two subjects, two label maps: neither replaced the other
    rows = list(csv.DictReader((out / "cases.csv").open()))
    assert [row["inputs"].split(";") for row in rows] == [
        [str(subjects / subject / "FLAIR.nii.gz"), str(subjects / subject / "T1.nii.gz")]
        for subject in ("patient-1", "patient-2")
    ]


def test_a_colliding_case_is_refused_before_anything_is_written(scan_run: Path, subjects: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(FedmedError, match="would both write outputs named 'patient-1'; nothing was written"):
        _predict(scan_run, [subjects / "patient-1", subjects / "patient-1"], out)
    assert not out.exists() or not any(out.iterdir())

    _predict(scan_run, [subjects / "patient-1"], out)
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    other = tmp_path / "elsewhere" / "patient-1"  # another patient, filed under the same folder name
    shutil.copytree(subjects / "patient-2", other)
    with pytest.raises(FedmedError, match="already holds outputs of a case named 'patient-1'"):
        _predict(scan_run, [other], out)
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before


def test_tta_uncertainty_maps_lie_on_each_source_grid(scan_run: Path, subjects: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    outcomes = _predict(scan_run, [subjects], out, uncertainty="tta", passes=2)
    for outcome in outcomes:
        assert outcome.ok, outcome.error
        source = subjects / outcome.case / "FLAIR.nii.gz"
        uncertainty = Path(outcome.uncertainty_map)
        assert uncertainty.name == f"{outcome.case}_uncertainty.nii.gz"
        shape, affine = _grid(uncertainty)
        source_shape, source_affine = _grid(source)
        assert shape == source_shape
        np.testing.assert_allclose(affine, source_affine, atol=1e-5)
        values = np.asarray(nib.load(str(uncertainty)).dataobj)
        assert values.min() >= 0.0 and values.max() <= 1.0 + 1e-6 and values.max() > 0.0
        assert 0.0 <= outcome.uncertainty <= 1.0
    rows = list(csv.DictReader((out / "cases.csv").open()))
    assert all(float(row["uncertainty"]) == pytest.approx(o.uncertainty, abs=1e-5) for row, o in zip(rows, outcomes))


def test_the_plain_prediction_is_unchanged_by_asking_for_no_uncertainty(
    scan_run: Path, subjects: Path, tmp_path: Path
) -> None:
    plain = _predict(scan_run, [subjects / "patient-1"], tmp_path / "a", uncertainty="none")
    again = _predict(scan_run, [subjects / "patient-1"], tmp_path / "b", uncertainty="tta", passes=1)
    assert plain[0].uncertainty is None and again[0].uncertainty is not None
    assert not (tmp_path / "a" / "patient-1_uncertainty.nii.gz").exists()


def test_every_case_gets_an_ood_score_from_the_runs_model_card(scan_run: Path, subjects: Path, tmp_path: Path) -> None:
    outcomes = _predict(scan_run, [subjects], tmp_path / "out")
    assert all(outcome.ood_score is not None and np.isfinite(outcome.ood_score) for outcome in outcomes)
    assert all(outcome.ood_flagged in (True, False) for outcome in outcomes)
    report = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "patient-1" in report and "patient-2" in report


def test_an_ensemble_needs_models_the_sites_let_travel(scan_run: Path, subjects: Path, tmp_path: Path) -> None:
    with pytest.raises(FedmedError, match="an ensemble needs at least two models"):
        _predict(scan_run, [subjects], tmp_path / "out", uncertainty="ensemble")


def test_the_cli_exits_non_zero_on_an_empty_folder_and_names_it(scan_run: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(app, ["predict", str(scan_run), str(empty), "--out", str(tmp_path / "out")])
    assert result.exit_code != 0
    assert str(empty) in result.output and "no NIfTI files" in result.output


def test_a_classifier_gets_calibrated_probabilities_uncertainty_and_saliency(tiny_config, tmp_path: Path) -> None:
    run = simulate(tiny_config(kind="classification", train={"rounds": 1})).run_dir.path
    (manifest,) = (run.parent / "data").glob("*/site-c/dataset.json")
    images = sorted((manifest.parent / "imagesTr").glob("*.nii.gz"))[:3]
    out = tmp_path / "out"
    outcomes = _predict(run, images, out, uncertainty="tta")
    trained = load_trained_model(run)
    for outcome, image in zip(outcomes, images, strict=True):
        assert outcome.ok, outcome.error
        assert sum(outcome.probabilities) == pytest.approx(1.0, abs=1e-5) and 0.0 <= outcome.uncertainty <= 1.0
        saliency = np.load(outcome.saliency)
        assert (
            saliency.shape == tuple(trained.config.task.image_size) and 0.0 <= saliency.min() <= saliency.max() <= 1.0
        )
        assert outcome.case == image.name.removesuffix(".nii.gz")
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert [row["case"] for row in rows] == [outcome.case for outcome in outcomes] and "uncertainty" in rows[0]


def test_a_bundle_carries_the_model_card_so_its_cases_score_alike(
    scan_run: Path, subjects: Path, tmp_path: Path
) -> None:
    bundle = write_bundle(load_trained_model(scan_run), out_dir=tmp_path / "bundle")
    assert (bundle / "configs" / "model_card.json").is_file()
    from_run = _predict(scan_run, [subjects], tmp_path / "run-out")
    from_bundle = _predict(bundle, [subjects], tmp_path / "bundle-out")
    assert [o.ood_score for o in from_bundle] == pytest.approx([o.ood_score for o in from_run], rel=1e-6)


def test_an_ensemble_combines_the_personalized_models_that_travelled(tiny_config, tmp_path: Path) -> None:
    config = tiny_config(train={"rounds": 1}, strategy={"fedbn": True}, evaluation={"cross_site": True})
    run = simulate(config).run_dir.path
    (manifest,) = (run.parent / "data").glob("*/site-c/dataset.json")
    images = sorted((manifest.parent / "imagesTr").glob("*.nii.gz"))[:2]
    outcomes = _predict(run, images, tmp_path / "out", uncertainty="ensemble")
    assert all(outcome.ok and Path(outcome.uncertainty_map).is_file() for outcome in outcomes)
    # Under FedBN the global model was never trained whole: the ensemble is the three sites' models.
    members = ensemble_members(load_trained_model(run, ensemble=True).run_dir)
    assert sorted(member.site for member in members) == ["site-a", "site-b", "site-c"]

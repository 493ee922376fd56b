"""`fedmed predict`: a trained model applied to new scans, one output file (or CSV row) per case.

Inputs are NIfTI files, folders of them, folders of subject folders (BraTS-style) or a dataset.json; every
case is named by a stable id (fedmed.data.case_layout) and two cases that would write the same output are
refused before anything is written. Each case is checked like `fedmed site check` checks training data; a
bad case is reported in `cases.csv` with the reason and the fix, and the others still complete.

Beside the output, when the run left a model card (fedmed.runs.model_card): calibrated class probabilities
and an out-of-distribution flag per case. On request, an uncertainty map and score per case (test-time
augmentation, or the ensemble of the models the sites shared), saliency maps for a classifier, and
`report.html` showing it all.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmed.config import TaskConfig
from fedmed.core.errors import FedmedError
from fedmed.core.files import unwritable_reason
from fedmed.core.log import logger
from fedmed.data.case_layout import CaseLayoutError, InputCase, find_cases
from fedmed.data.manifest import Case
from fedmed.data.preprocess import PER_IMAGE_MODES
from fedmed.data.problems import DataProblem
from fedmed.data.validation import check_case_images
from fedmed.runs.model_card import ModelCard
from fedmed.tasks.apply import Prediction, Predictor
from fedmed.tasks.explain import saliency_map
from fedmed.tasks.ood import ood_score
from fedmed.tasks.uncertainty import InvertibleAugmentation, check_method, tta_augmentations

from .predict_files import (
    OUTPUT_POSTFIX,
    SALIENCY_POSTFIX,
    UNCERTAINTY_POSTFIX,
    CaseOutcome,
    PredictOutputError,
    cannot_write,
    output_path,
    refuse_other_cases_under_same_ids,
    write_array,
    write_like_source,
    write_tables,
)
from .prediction_report import ReportCase, ReportModel, write_prediction_report
from .trained_model import TrainedModel, ensemble_members

REPORT_FILE = "report.html"
# Occlusion in 2D: on fedmed's DenseNet (group norm) Grad-CAM spread a local cue over the whole image in tests where
# occlusion put 0.97 of the map on it (tests/tasks/test_explain.py); in 3D occlusion costs a forward pass per patch.
SALIENCY_METHOD = {2: "occlusion", 3: "gradcam"}

__all__ = ["CaseOutcome", "PredictOptions", "PredictOutputError", "input_cases", "predict_cases"]


@dataclass(frozen=True)
class PredictOptions:
    """What to compute beside each case's output."""

    uncertainty: str = "none"  # none | tta (test-time augmentation) | ensemble (the models the sites shared)
    passes: int | None = None  # tta: how many augmented passes beside the plain one (default: all, see uncertainty)
    explain: bool = True  # classification: a saliency map per case (occlusion in 2D, Grad-CAM in 3D)
    report: bool = True  # report.html


def input_cases(inputs: Sequence[Path], *, task: TaskConfig) -> list[InputCase]:
    """The cases in `inputs`, each its files in the model's channel order and its id (see case_layout)."""
    try:
        return find_cases([Path(path) for path in inputs], channels=task.channels, channel_names=task.channel_names)
    except CaseLayoutError as error:
        raise FedmedError(str(error)) from None


def predict_cases(
    trained: TrainedModel,
    cases: Sequence[InputCase],
    *,
    out_dir: Path,
    device: Any,
    options: PredictOptions = PredictOptions(),
) -> Iterator[CaseOutcome]:
    """Predict each case, write its outputs, yield its outcome; cases.csv, predictions.csv and the report at
    the end (also when stopped early: what was predicted stays listed)."""
    out_dir = Path(out_dir)
    _refuse_site_intensity(trained)
    check_method(options.uncertainty)
    if problem := unwritable_reason(out_dir):  # before any case: finding out after the first is too late
        raise PredictOutputError(cannot_write(out_dir, problem))
    refuse_other_cases_under_same_ids(out_dir, [(case.case_id, _inputs(case)) for case in cases])
    card = trained.card
    predictor = _predictor(trained, card=card, device=device, options=options)
    outcomes: list[CaseOutcome] = []
    try:
        for case in cases:
            outcome = _predict_one(predictor, case, trained=trained, card=card, out_dir=out_dir, options=options)
            outcomes.append(outcome)
            yield outcome
    finally:
        _write_summaries(out_dir, outcomes, cases=cases, trained=trained, card=card, options=options)


def _predictor(trained: TrainedModel, *, card: ModelCard | None, device: Any, options: PredictOptions) -> Predictor:
    task = trained.config.task
    ensemble = options.uncertainty == "ensemble"
    members = ensemble_members(trained.run_dir, source=trained.description) if ensemble else [trained]
    if len(members) > 1:
        logger.info("ensemble of %d models: %s", len(members), "; ".join(m.description for m in members))
    temperature = card.temperature if card is not None and task.kind == "classification" else None
    return Predictor(
        [member.build(device=device) for member in members],
        config=trained.config,
        device=device,
        augmentations=_augmentations(trained, count=options.passes) if options.uncertainty == "tta" else (),
        temperature=temperature,
        uncertainty=options.uncertainty != "none",
        features=card is not None and card.ood_mean is not None,
    )


def _augmentations(trained: TrainedModel, *, count: int | None) -> list[InvertibleAugmentation]:
    train = trained.config.train
    return tta_augmentations(
        trained.config.task.spatial_dims, trained_with_flips=train.augment and train.augmentation.flips, count=count
    )


def _predict_one(
    predictor: Predictor,
    case: InputCase,
    *,
    trained: TrainedModel,
    card: ModelCard | None,
    out_dir: Path,
    options: PredictOptions,
) -> CaseOutcome:
    name, inputs = case.case_id, _inputs(case)
    manifest_case = Case(image=case.images[0], other_modalities=case.images[1:])
    image, problems = check_case_images(manifest_case, task=trained.config.task, entry=name)
    errors = [problem for problem in problems if problem.severity == "error"]
    if not errors and image is not None:
        errors = _channel_problems(image, case=case, trained=trained)
    if errors or image is None:
        return CaseOutcome(case=name, inputs=inputs, error="; ".join(map(str, errors)) or f"{name}: could not be read")
    try:
        prediction = predictor.predict(image, files=[str(path) for path in case.images])
    except Exception as error:  # one case's failure must not stop the others
        logger.debug("prediction of %s failed", name, exc_info=True)
        return CaseOutcome(
            case=name, inputs=inputs, error=f"{name}: prediction failed ({type(error).__name__}: {error})"
        )
    outcome = CaseOutcome(case=name, inputs=inputs, uncertainty=prediction.uncertainty)
    _score_ood(outcome, prediction, card=card)
    kind = trained.config.task.kind
    if prediction.probabilities is not None:
        outcome.probabilities = prediction.probabilities
        if options.explain and prediction.model_input is not None:
            outcome.saliency = _explain(predictor, prediction, case_id=name, out_dir=out_dir)
        return outcome
    target = output_path(out_dir, name, OUTPUT_POSTFIX[kind])
    write_like_source(target, prediction.volume, source=case.images[0], label=kind == "segmentation")
    outcome.output = str(target)
    if prediction.uncertainty_map is not None:
        uncertainty = output_path(out_dir, name, UNCERTAINTY_POSTFIX)
        write_like_source(uncertainty, prediction.uncertainty_map, source=case.images[0], label=False)
        outcome.uncertainty_map = str(uncertainty)
    return outcome


def _score_ood(outcome: CaseOutcome, prediction: Prediction, *, card: ModelCard | None) -> None:
    if card is None or card.ood_mean is None or card.ood_var is None or prediction.features is None:
        return
    outcome.ood_score = ood_score(prediction.features, mean=card.ood_mean, var=card.ood_var, groups=card.ood_groups)
    if card.ood_threshold is not None:
        outcome.ood_flagged = outcome.ood_score > card.ood_threshold


def _explain(predictor: Predictor, prediction: Prediction, *, case_id: str, out_dir: Path) -> str:
    probabilities = prediction.probabilities or []
    target = max(range(len(probabilities)), key=probabilities.__getitem__)
    assert prediction.model_input is not None
    model_input = prediction.model_input[None].to(predictor.device)
    try:
        method = SALIENCY_METHOD[predictor.config.task.spatial_dims]
        saliency = saliency_map(predictor.model, model_input, target_class=target, method=method)
    except Exception:  # an explanation is an extra: the prediction stands without it
        logger.warning("%s: no saliency map (see --verbose)", case_id)
        logger.debug("saliency of %s failed", case_id, exc_info=True)
        return ""
    path = output_path(out_dir, case_id, SALIENCY_POSTFIX, suffix=".npy")
    write_array(path, saliency)
    return str(path)


def _write_summaries(
    out_dir: Path,
    outcomes: list[CaseOutcome],
    *,
    cases: Sequence[InputCase],
    trained: TrainedModel,
    card: ModelCard | None,
    options: PredictOptions,
) -> None:
    task = trained.config.task
    class_names = [task.class_name(v) for v in range(task.num_classes)] if task.kind == "classification" else None
    try:
        write_tables(out_dir, outcomes, class_names=class_names)
        if options.report and outcomes:
            model = report_model(trained, card=card, uncertainty=options.uncertainty)
            write_prediction_report(out_dir, cases=report_cases(outcomes, cases=cases), model=model)
    except OSError as error:
        raise PredictOutputError(cannot_write(out_dir, error.strerror or str(error))) from None


def report_model(trained: TrainedModel, *, card: ModelCard | None, uncertainty: str) -> ReportModel:
    task = trained.config.task
    return ReportModel(
        description=trained.description,
        kind=task.kind,
        class_names=[task.class_name(value) for value in range(task.num_classes)],
        channel_names=list(task.channel_names or [f"channel{i}" for i in range(task.channels)]),
        uncertainty_method=None if uncertainty == "none" else uncertainty,
        ood_threshold=card.ood_threshold if card is not None else None,
        temperature=card.temperature if card is not None and task.kind == "classification" else None,
        calibration=dict(card.calibration) if card is not None else {},
    )


def report_cases(outcomes: Sequence[CaseOutcome], *, cases: Sequence[InputCase]) -> list[ReportCase]:
    inputs = {case.case_id: list(case.images) for case in cases}
    return [
        ReportCase(
            case=outcome.case,
            inputs=inputs.get(outcome.case, [Path(path) for path in outcome.inputs]),
            status="ok" if outcome.ok else "failed",
            error=outcome.error,
            output=Path(outcome.output) if outcome.output else None,
            uncertainty_map=Path(outcome.uncertainty_map) if outcome.uncertainty_map else None,
            uncertainty=outcome.uncertainty,
            ood_score=outcome.ood_score,
            ood_flagged=outcome.ood_flagged,
            probabilities=outcome.probabilities,
            saliency=Path(outcome.saliency) if outcome.saliency else None,
        )
        for outcome in outcomes
    ]


def _inputs(case: InputCase) -> list[str]:
    return [str(path.absolute()) for path in case.images]


def _refuse_site_intensity(trained: TrainedModel) -> None:
    mode = trained.config.task.intensity
    if mode not in (*PER_IMAGE_MODES, "ct_window"):
        raise FedmedError(
            f"{trained.description}: trained with task.intensity = '{mode}', which maps intensities with the "
            "training sites' own statistics; fedmed predict applies models trained with a per-image mode "
            "(zscore, percentile, minmax, ct_window, none)"
        )


def _channel_problems(image: Any, *, case: InputCase, trained: TrainedModel) -> list[Any]:
    expected = trained.config.task.channels
    found = int(image.shape[0])
    if found == expected:
        return []
    return [
        DataProblem(
            str(case.images[0]),
            f"the case has {found} channel(s) but the model takes {expected} (one per modality it was trained on)",
            f"give the case's {expected} modality file(s) in the training order, e.g. a dataset.json entry "
            '{"image": ["./flair.nii.gz", "./t1.nii.gz"]}',
        )
    ]

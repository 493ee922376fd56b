"""Commands on a trained model: apply it to new scans, hand it over in a format other tools load."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from fedmed.core.log import logger

from .common import setup_logging, user_errors

ModelArgument = Annotated[
    Path,
    typer.Argument(
        help="A run directory (its global model), a checkpoint, a site's run folder or an exported bundle.",
        metavar="MODEL",
    ),
]
SiteOption = Annotated[
    str | None, typer.Option("--site", help="Use this site's personalized model from the run directory.")
]


def predict(
    model: ModelArgument,
    images: Annotated[
        list[Path],
        typer.Argument(
            help="NIfTI files, folders of them, folders of subject folders (one per case) or a dataset.json.",
            metavar="IMAGES...",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder for the outputs, cases.csv and report.html.")],
    site: SiteOption = None,
    uncertainty: Annotated[
        str,
        typer.Option(
            help="none; tta: predict augmented copies of the scan (flips, shifts) and measure their disagreement; "
            "ensemble: the models the sites shared. Writes <case>_uncertainty.nii.gz and a per-case score."
        ),
    ] = "none",
    passes: Annotated[
        int | None, typer.Option(min=1, help="tta: augmented passes beside the plain one (default: all, 4–5).")
    ] = None,
    explain: Annotated[
        bool, typer.Option(help="Classification: a saliency map per case (occlusion in 2D, Grad-CAM in 3D).")
    ] = True,
    report: Annotated[bool, typer.Option(help="Write report.html: every case, its overlays and scores.")] = True,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda.")] = "auto",
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Apply a trained model to new scans: label maps / restored images on each scan's own grid, or class
    probabilities in predictions.csv; each case named by its id, with its inputs listed in cases.csv. A bad
    case is listed in cases.csv; the others still complete."""
    # Deferred: fedmed.tasks and fedmed.workflows load torch and MONAI, which `fedmed --help` must not wait for.
    from fedmed.tasks import select_device
    from fedmed.workflows.predict import PredictOptions, input_cases, predict_cases
    from fedmed.workflows.trained_model import load_trained_model

    setup_logging(verbose)
    with user_errors():
        trained = load_trained_model(model, site=site, ensemble=uncertainty == "ensemble")
        cases = input_cases(images, task=trained.config.task)
        options = PredictOptions(uncertainty=uncertainty, passes=passes, explain=explain, report=report)
        logger.info("applying the %s to %d case(s)", trained.description, len(cases))
        outcomes = predict_cases(trained, cases, out_dir=out, device=select_device(device), options=options)
        failed = []
        for number, outcome in enumerate(outcomes, start=1):
            if outcome.ok:
                logger.info("case %d/%d %s: %s", number, len(cases), outcome.case, _described(outcome))
            else:
                failed.append(outcome)
                logger.error("case %d/%d %s failed: %s", number, len(cases), outcome.case, outcome.error)
    typer.echo(f"{len(cases) - len(failed)} of {len(cases)} case(s) predicted into {out} (cases.csv lists each)")
    if report and (out / "report.html").is_file():
        typer.echo(f"report: {out / 'report.html'}")
    if failed:
        raise typer.Exit(code=1)


def _described(outcome: Any) -> str:
    parts = [outcome.output or "probabilities in predictions.csv"]
    if outcome.uncertainty is not None:
        parts.append(f"uncertainty {outcome.uncertainty:.3f}")
    if outcome.ood_flagged:
        parts.append(f"UNLIKE THE TRAINING DATA (score {outcome.ood_score:.1f})")
    return ", ".join(parts)


def export(
    model: ModelArgument,
    out: Annotated[Path, typer.Option("--out", help="New folder (bundle) or file (torchscript).")],
    output_format: Annotated[str, typer.Option("--format", help="bundle (MONAI Bundle) or torchscript.")] = "bundle",
    site: SiteOption = None,
) -> None:
    """Hand a trained model over: a MONAI Bundle that MONAI's bundle runner applies without fedmed, or one
    TorchScript file."""
    # Deferred: fedmed.workflows loads torch and MONAI, which `fedmed --help` must not wait for.
    from fedmed.workflows.export import export_model
    from fedmed.workflows.trained_model import load_trained_model

    with user_errors():
        trained = load_trained_model(model, site=site)
        written = export_model(trained, out=out, output_format=output_format)
    if output_format == "bundle":
        typer.echo(f"MONAI bundle: {written}  (run it: see {written / 'README.md'})")
    else:
        typer.echo(f"TorchScript: {written}")

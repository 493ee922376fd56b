"""`predictions/report.html`: what a clinician looks at after `fedmed predict`, one self-contained page.

Per case: slices of the first input channel with the label map's contour and the uncertainty map as a heat
overlay (3D: axial, coronal and sagittal planes through the predicted foreground), the per-case uncertainty
score, the out-of-distribution flag, and for classification the class probabilities, the predicted class and
the saliency overlay. Failed cases are listed with their error, in the order given. Every image is embedded
as a PNG data URI and the page loads nothing else, so it can be mailed or archived as one file; it shows
patient images, so it is written readable by its owner only.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedmed.core.files import write_text_atomic
from fedmed.core.log import logger
from fedmed.runs import slices
from fedmed.runs.report import figure_check_script
from fedmed.runs.slices import DisplayImage

REPORT_FILE = "report.html"
UNCERTAINTY_COLOURS = "inferno"
SALIENCY_COLOURS = "jet"
OOD_MESSAGE = "unlike the training data: check the scan/protocol before trusting the output"
UNCERTAINTY_PERCENTILE = 99.5  # the colour scale's top: one extreme voxel must not flatten every other case

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; padding: 0 1rem; }
table { border-collapse: collapse; margin: 0.6rem 0; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
section.case { border-top: 2px solid #ddd; padding: 0.4rem 0 1rem; }
section.case.failed { background: #fafafa; }
.figures { display: flex; flex-wrap: wrap; gap: 0.6rem; align-items: flex-start; }
figure { margin: 0; display: table; }
figcaption { display: table-caption; caption-side: bottom; font-size: 0.8rem; color: #555; }
section.case.flagged { border-left: 4px solid #b00; padding-left: 0.8rem; }
img { display: block; border: 1px solid #eee; image-rendering: auto; }
.ood { border: 2px solid #b00; background: #fff0f0; color: #900; font-weight: 600; padding: 0.4rem 0.6rem; }
.badge { font-size: 0.85rem; padding: 0.1rem 0.4rem; border-radius: 0.2rem; }
.badge.ood, .badge.failed { background: #b00; color: #fff; border: 0; }
.badge.ok { background: #2a7; color: #fff; }
pre.error { white-space: pre-wrap; background: #fff4f4; border: 1px solid #e99; padding: 0.5rem; }
.bar { display: inline-block; height: 0.7rem; background: #47a; vertical-align: middle; }
.predicted { font-weight: 700; }
.muted { color: #777; } .swatch { display: inline-block; width: 0.9rem; height: 0.9rem; vertical-align: middle; }
.figure-missing { border: 1px dashed #b00; color: #b00; background: #fff4f4; padding: 0.6rem; }
"""

SCRIPT = figure_check_script(named_by="alt")  # images are embedded: their alt text names them


@dataclass
class ReportCase:
    case: str  # the case id
    inputs: list[Path]  # the input image file(s), channel order
    status: str  # "ok" | "failed"
    error: str = ""
    output: Path | None = None  # label map (segmentation) or restored image (enhancement), NIfTI on the source grid
    uncertainty_map: Path | None = None  # NIfTI on the source grid, float, higher = less sure
    uncertainty: float | None = None  # per-case score
    ood_score: float | None = None
    ood_flagged: bool | None = None
    probabilities: list[float] | None = None  # classification (calibrated when a temperature was applied)
    saliency: Path | None = None  # .npy of the saliency map on the model's input grid (classification)


@dataclass
class ReportModel:
    description: str
    kind: str
    class_names: list[str]
    channel_names: list[str]
    uncertainty_method: str | None
    ood_threshold: float | None
    temperature: float | None
    calibration: dict[str, dict] = field(default_factory=dict)  # per site: {"ece_before", "ece_after", ...}


def write_prediction_report(out_dir: Path, *, cases: list[ReportCase], model: ReportModel) -> Path:
    """Write `out_dir`/report.html (atomically, owner-only) and return its path."""
    scale = _uncertainty_scale(cases)
    sections = [_case_section(number, case, model=model, scale=scale) for number, case in enumerate(cases, 1)]
    failed = sum(case.status != "ok" for case in cases)
    flagged = sum(bool(case.ood_flagged) for case in cases)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fedmed predictions</title>
<style>{STYLE}</style>
<script>{SCRIPT}</script></head><body>
<h1>Predictions</h1>
<p>{len(cases)} case(s): {len(cases) - failed} predicted, {failed} failed, {flagged} flagged as unlike the
training data. Model: {html.escape(model.description)}</p>
{_legend(model, scale=scale, maps=any(case.uncertainty_map is not None for case in cases))}
{_model_section(model)}
{_overview(cases, model=model)}
{"".join(sections)}
</body></html>
"""
    path = Path(out_dir) / REPORT_FILE
    write_text_atomic(path, page, private=True)
    return path


# Reading the files ------------------------------------------------------------------------------------
def _uncertainty_scale(cases: list[ReportCase]) -> float:
    """One colour scale for every case's uncertainty map, so equal colours mean equal uncertainty."""
    tops = []
    for case in cases:
        if case.status == "ok" and case.uncertainty_map is not None:
            try:
                values = slices.read_display(case.uncertainty_map).array
            except Exception as error:
                logger.warning("report: cannot read %s (%s)", case.uncertainty_map, error)
                continue
            finite = values[np.isfinite(values)]
            if finite.size:
                tops.append(float(np.percentile(finite, UNCERTAINTY_PERCENTILE)))
    top = max(tops, default=0.0)
    return top if top > 0 else 1.0


def _same_grid(image: DisplayImage, path: Path | None, *, what: str, notes: list[str]) -> np.ndarray | None:
    if path is None:
        return None
    try:
        other = slices.read_display(path).array
    except Exception as error:  # the image and the other overlays are still worth showing
        notes.append(f"{what} not shown: cannot read {Path(path).name} ({type(error).__name__}: {error})")
        return None
    if other.shape != image.array.shape:
        notes.append(f"{what} not shown: its grid {other.shape} does not match the input image {image.array.shape}")
        return None
    return other


def _saliency(image: DisplayImage, path: Path | None, *, notes: list[str]) -> np.ndarray | None:
    if path is None:
        return None
    try:
        values = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        notes.append(f"saliency not shown: cannot read {Path(path).name} ({error})")
        return None
    while values.ndim > image.array.ndim and values.shape[0] == 1:
        values = values[0]  # a batch or channel axis left on
    if values.ndim != image.array.ndim:
        notes.append(f"saliency not shown: {values.ndim}D map for a {image.array.ndim}D image")
        return None
    # On the model's input grid (RAS for volumes, the stored axes for 2D) resized to the image's voxels.
    return slices.resample_to(values, image.array.shape)


# Figures ----------------------------------------------------------------------------------------------
def _figures(case: ReportCase, *, model: ReportModel, scale: float) -> tuple[str, list[str]]:
    """The case's images as rows of HTML <figure>s, and notes on what could not be shown."""
    notes: list[str] = []
    image = slices.read_display(case.inputs[0])
    levels = slices.window(image.array)
    volume = image.array
    labels = _same_grid(image, case.output, what="label map", notes=notes) if model.kind == "segmentation" else None
    restored = (
        _same_grid(image, case.output, what="restored image", notes=notes) if model.kind == "enhancement" else None
    )
    uncertainty = _same_grid(image, case.uncertainty_map, what="uncertainty map", notes=notes)
    saliency = _saliency(image, case.saliency, notes=notes)
    views = [
        ("image" if labels is None else "image, predicted contour", slices.contour_view(volume, labels, levels=levels))
    ]
    if restored is not None:
        views.append(("restored", slices.grey_view(restored, levels=slices.window(restored))))
    if uncertainty is not None:
        heat = slices.heat_view(volume, uncertainty, levels=levels, scale=scale, colour_map=UNCERTAINTY_COLOURS)
        views.append(("uncertainty", heat))
    if saliency is not None:
        views.append(
            ("saliency", slices.heat_view(volume, saliency, levels=levels, scale=1.0, colour_map=SALIENCY_COLOURS))
        )
    # Planes through the predicted structure, or through the salient region for a classified volume.
    focus = labels if labels is not None else (saliency >= 0.5 if saliency is not None else None)
    planes = slices.centre_planes(image, focus=focus)
    channel = model.channel_names[0] if model.channel_names else "first channel"
    rows = []
    for title, view in views:
        figures = []
        for plane in planes:
            where = f"{plane.name} slice {plane.index}" if image.is_volume else "image"
            caption = f"{title} · {where} · {channel}" if image.is_volume else f"{title} · {channel}"
            figures.append(_figure(view(plane), alt=f"{case.case}: {title}, {where}", caption=caption))
        rows.append("".join(figures))
    # a volume: one row of three planes per view; a 2D image: its views side by side
    if not image.is_volume:
        rows = ["".join(rows)]
    return "".join(f'<div class="figures">{row}</div>' for row in rows), notes


def _figure(pixels: np.ndarray, *, alt: str, caption: str) -> str:
    return (
        f'<figure><img src="{slices.png_data_uri(pixels)}" alt="{html.escape(alt)}" width="{pixels.shape[1]}" '
        f'height="{pixels.shape[0]}"><figcaption>{html.escape(caption)}</figcaption></figure>'
    )


# Sections ---------------------------------------------------------------------------------------------
def _case_section(number: int, case: ReportCase, *, model: ReportModel, scale: float) -> str:
    name = html.escape(case.case)
    inputs = ", ".join(
        f'<code title="{html.escape(str(path))}">{html.escape(Path(path).name)}</code>'
        + (f" ({html.escape(model.channel_names[index])})" if index < len(model.channel_names) else "")
        for index, path in enumerate(case.inputs)
    )
    flag = _ood_state(case)
    head = (
        f'<section class="case {"ok" if case.status == "ok" else "failed"}{" flagged" if flag == "flagged" else ""}" '
        f'id="case-{number}" data-case="{name}" data-status="{html.escape(case.status)}" data-ood="{flag}">\n'
        f'<h2>{number}. {name} {_status_badge(case)}</h2>\n<p class="muted">Input: {inputs or "none"}</p>\n'
    )
    if case.status != "ok":
        error = case.error or "failed without a message"
        return head + f'<p>No prediction for this case:</p><pre class="error">{html.escape(error)}</pre></section>\n'
    body = (
        f'<p class="ood">{html.escape(OOD_MESSAGE[:1].upper() + OOD_MESSAGE[1:])}.</p>\n' if flag == "flagged" else ""
    )
    body += _scores(case, model=model)
    try:
        figures, notes = _figures(case, model=model, scale=scale)
    except Exception as error:
        logger.warning("report: cannot draw case %s (%s)", case.case, error)
        figures, notes = "", [f"images not shown: {type(error).__name__}: {error}"]
    body += "".join(f'<p class="figure-missing">{html.escape(note)}</p>' for note in notes) + figures
    return head + body + "</section>\n"


def _ood_state(case: ReportCase) -> str:
    if case.ood_flagged is None:
        return "not-assessed"
    return "flagged" if case.ood_flagged else "clear"


def _status_badge(case: ReportCase) -> str:
    if case.status != "ok":
        return '<span class="badge failed">failed</span>'
    if case.ood_flagged:
        return '<span class="badge ood">unlike the training data</span>'
    return '<span class="badge ok">ok</span>'


def _number(value: float | None, *, digits: int = 3) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _scores(case: ReportCase, *, model: ReportModel) -> str:
    rows = []
    if case.uncertainty is not None or model.uncertainty_method:
        method = f" ({html.escape(model.uncertainty_method)})" if model.uncertainty_method else ""
        rows.append(f'<tr><th>uncertainty{method}</th><td class="num">{_number(case.uncertainty)}</td></tr>')
    if case.ood_score is not None or case.ood_flagged is not None:
        threshold = f" (flagged above {_number(model.ood_threshold)})" if model.ood_threshold is not None else ""
        rows.append(f'<tr><th>unlike training data{threshold}</th><td class="num">{_number(case.ood_score)}</td></tr>')
    table = f"<table>{''.join(rows)}</table>\n" if rows else ""
    return table + (_probabilities(case.probabilities, model=model) if case.probabilities else "")


def _class_name(index: int, model: ReportModel) -> str:
    return model.class_names[index] if index < len(model.class_names) else f"class {index}"


def _probabilities(probabilities: list[float], *, model: ReportModel) -> str:
    predicted = int(np.argmax(probabilities))
    calibrated = f", calibrated (temperature {model.temperature:.3g})" if model.temperature else ""
    rows = "".join(
        f'<tr class="{"predicted" if index == predicted else ""}"><td>{html.escape(_class_name(index, model))}'
        f'{" ← predicted" if index == predicted else ""}</td><td class="num">{value:.3f}</td>'
        f'<td><span class="bar" style="width:{max(0.0, min(1.0, value)) * 120:.0f}px"></span></td></tr>'
        for index, value in enumerate(probabilities)
    )
    return (
        f'<p>Predicted class: <span class="predicted">{html.escape(_class_name(predicted, model))}</span></p>\n'
        f"<table><tr><th>class</th><th>probability{calibrated}</th><th></th></tr>{rows}</table>\n"
    )


def _overview(cases: list[ReportCase], *, model: ReportModel) -> str:
    rows = []
    for number, case in enumerate(cases, 1):
        if case.status != "ok":
            result = f'<span class="badge failed">failed</span> {html.escape(_first_line(case.error))}'
        elif case.probabilities:
            result = html.escape(_class_name(int(np.argmax(case.probabilities)), model))
        else:
            result = html.escape(Path(case.output).name) if case.output is not None else ""
        ood = {"flagged": '<span class="badge ood">check scan</span>', "clear": "no", "not-assessed": ""}
        rows.append(
            f'<tr><td class="num">{number}</td><td><a href="#case-{number}">{html.escape(case.case)}</a></td>'
            f'<td>{result}</td><td class="num">{_number(case.uncertainty)}</td><td>{ood[_ood_state(case)]}</td></tr>'
        )
    return (
        "<h2>Cases</h2>\n<table><tr><th>#</th><th>case</th><th>result</th><th>uncertainty</th>"
        f"<th>unlike training data</th></tr>{''.join(rows)}</table>\n"
    )


def _first_line(text: str) -> str:
    lines = (text or "failed").strip().splitlines()
    return lines[0] if lines else "failed"


def _legend(model: ReportModel, *, scale: float, maps: bool) -> str:
    uncertainty = "<li><b>Uncertainty</b> (higher = less sure): one score per case"
    if maps:
        bar = slices.png_data_uri(slices.colour_bar(UNCERTAINTY_COLOURS))
        uncertainty += (
            ", summarizing the map drawn on the images. There, transparent means sure and "
            f'<img src="{bar}" alt="uncertainty colour scale" width="160" height="12" '
            f'style="display:inline;vertical-align:middle"> runs from 0 to {scale:.3g}, the same scale for every '
            "case. Look hardest where the colour sits on an outline you would act on"
        )
    items = [
        uncertainty + ".</li>",
        f"<li><b>Unlike the training data</b>: the scan differs from what the model learned from (another "
        f"scanner, protocol, body part or artefacts). A flagged case reads <q>{html.escape(OOD_MESSAGE)}</q>.</li>",
    ]
    if model.kind == "segmentation" and len(model.class_names) > 1:
        swatches = " ".join(
            f'<span class="swatch" style="background:rgb{slices.label_colour(index)}"></span> {html.escape(name)}'
            for index, name in enumerate(model.class_names)
            if index > 0
        )
        items.insert(0, f"<li><b>Contours</b>: the predicted label map's outline per class: {swatches}.</li>")
    if model.kind == "classification":
        items.append(
            "<li><b>Saliency</b>: where in the image the predicted class came from (red = most); it shows what the "
            "model used, not that it was right.</li>"
        )
    return f"<h2>How to read this report</h2>\n<ul>{''.join(items)}</ul>\n"


def _model_section(model: ReportModel) -> str:
    rows = [
        ("task", model.kind),
        ("input channels", ", ".join(model.channel_names) or "n/a"),
        ("classes", ", ".join(model.class_names) or "n/a"),
        ("uncertainty method", model.uncertainty_method or "none"),
        ("OOD threshold", _number(model.ood_threshold)),
        ("temperature", _number(model.temperature) if model.temperature is not None else "none (uncalibrated)"),
    ]
    table = "".join(f"<tr><th>{html.escape(key)}</th><td>{html.escape(value)}</td></tr>" for key, value in rows)
    return f"<h2>Model</h2>\n<table>{table}</table>\n{_calibration(model.calibration)}"


def _calibration(calibration: dict[str, dict]) -> str:
    if not calibration:
        return ""
    keys = ["ece_before", "ece_after"]
    # scalar columns only (cases assessed, ...): the reliability bins beside them are for diagrams, not cells
    keys += sorted(
        {key for entry in calibration.values() for key, value in entry.items() if _scalar(value)} - set(keys)
    )
    head = "".join(f"<th>{html.escape(key.replace('_', ' '))}</th>" for key in keys)
    body = "".join(
        f"<tr><td>{html.escape(str(site))}</td>"
        + "".join(f'<td class="num">{_cell(entry.get(key))}</td>' for key in keys)
        + "</tr>"
        for site, entry in calibration.items()
    )
    return (
        '<h3>Calibration per site</h3>\n<p class="muted">Expected calibration error (ECE) on each site\'s tuning '
        "split, before and after temperature scaling: 0 means a 70 % probability is right 70 % of the time.</p>\n"
        f"<table><tr><th>site</th>{head}</tr>{body}</table>\n"
    )


def _scalar(value: object) -> bool:
    return value is None or isinstance(value, int | float | str)


def _cell(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return html.escape("n/a" if value is None else str(value))
    return str(value) if isinstance(value, int) else _number(value, digits=4)

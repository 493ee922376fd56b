"""The run's HTML report: plots and tables a person can open offline."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from fedmed.core.files import write_text_atomic

from . import plots
from .calibration_report import calibration_section
from .contributions import contributions_section
from .run_dir import CROSS_SITE_FILE, NORMALIZATION_FILE, STATUS_FILE, SUMMARY_FILE, RunDirectory
from .summary import COLUMNS, describe_client_privacy, describe_gains, describe_starting_point
from .traffic import traffic_section

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 960px; color: #222; padding: 0 1rem; }
table { border-collapse: collapse; margin: 1rem 0; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.7rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th.text, td.text { text-align: left; }
td.na { color: #888; background: #eee; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5rem 0; display: block; }
.muted { color: #777; }
.figure-missing { border: 1px dashed #b00; color: #b00; background: #fff4f4; padding: 0.6rem; }
"""


# Runs after every image has loaded or failed: a report copied without its plots/ folder says so on the page,
# and data-figures="loaded/total" lets a headless browser check the page without a screenshot diff.
def figure_check_script(*, named_by: str) -> str:
    """The page's check of its images; a missing one is replaced by a note naming it by its `named_by` attribute."""
    return """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images), loaded = 0;
  images.forEach(function (image) {
    if (image.complete && image.naturalWidth > 0) { loaded += 1; return; }
    var note = document.createElement("p");
    note.className = "figure-missing";
    note.textContent = "figure missing: " + image.getAttribute("NAMED_BY");
    image.replaceWith(note);
  });
  document.body.dataset.figures = loaded + "/" + images.length;
});
""".replace("NAMED_BY", named_by)


SCRIPT = figure_check_script(named_by="src")


def write_report(run_dir: RunDirectory) -> Path:
    """Write report.html and its figures under plots/; every input file is optional."""
    summary = _json_object(run_dir, SUMMARY_FILE)
    cross_site = _json_object(run_dir, CROSS_SITE_FILE)
    normalization = _json_object(run_dir, NORMALIZATION_FILE)
    rows = run_dir.read_metrics()
    rounds = run_dir.read_rounds()
    metric = str(summary.get("primary_metric", "loss"))
    plot_dir = run_dir.path / "plots"
    plot_dir.mkdir(exist_ok=True)
    curves = [
        plots.learning_curves(
            rows,
            phase="evaluate",
            metric=metric,
            path=plot_dir / "learning_curves.png",
            title=f"global model {metric} at each site",
        ),
        plots.learning_curves(
            rows, phase="train", metric="train_loss", path=plot_dir / "train_loss.png", title="local training loss"
        ),
    ]
    sections = [
        _summary_section(summary, bar_chart=plots.final_by_site(summary, path=plot_dir / "final_by_site.png")),
        _cross_site_section(cross_site, heatmap=plots.cross_site_heatmap(cross_site, path=plot_dir / "cross_site.png")),
        _learning_curves_section(curves),
        _privacy_section(summary),
        _normalization_section(
            normalization,
            figure=plots.intensity_histograms(normalization, path=plot_dir / "intensity_histograms.png"),
        ),
        calibration_section(run_dir.path, plot_dir=plot_dir),
        contributions_section(rounds, plot_dir=plot_dir),
        _participation_section(rounds, status=_json_object(run_dir, STATUS_FILE)),
        traffic_section(rounds),
    ]
    name = html.escape(run_dir.path.name)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fedmed run {name}</title>
<style>{STYLE}</style>
<script>{SCRIPT}</script></head><body>
<h1>fedmed run <code>{name}</code></h1>
<p class="muted">Configuration: <a href="config.toml">config.toml</a> · metrics:
<a href="metrics.csv">metrics.csv</a> · final model: <code>checkpoints/final.pt</code></p>
{_starting_point(summary)}
{"".join(sections)}
</body></html>
"""
    write_text_atomic(run_dir.report_html, page, private=False)
    return run_dir.report_html


def _starting_point(summary: dict[str, Any]) -> str:
    line = describe_starting_point(summary.get("starting_point"), start=summary.get("start"))
    return f'<p class="muted">{html.escape(line[0].upper() + line[1:])}</p>' if line else ""


def _json_object(run_dir: RunDirectory, name: str) -> dict[str, Any]:
    # Absent files are normal (older runs, features switched off); a non-object is treated the same way.
    data = run_dir.read_json(name)
    return data if isinstance(data, dict) else {}


def _image(figure: Path | None, *, alt: str) -> str:
    if figure is None:
        return ""
    return f'<img src="plots/{html.escape(figure.name)}" alt="{html.escape(alt)}">'


def _column_label(column: str) -> str:
    return column.replace("_", "-")


# Summary ---------------------------------------------------------------------------------------
def _summary_section(summary: dict[str, Any], *, bar_chart: Path | None) -> str:
    metric = str(summary.get("primary_metric", "loss"))
    title = " vs ".join(_column_label(column) for column in COLUMNS)
    # The answer each site asks first: did joining beat training alone?
    gains = "".join(f"<li>{html.escape(line)}</li>" for line in describe_gains(summary))
    return (
        f"<h2>{html.escape(title[:1].upper() + title[1:])} ({html.escape(metric)})</h2>\n"
        + (f"<ul>{gains}</ul>\n" if gains else "")
        + f"{_summary_table(summary)}\n{_image(bar_chart, alt=f'final {metric} per site')}\n"
        f"{_metrics_table(summary)}"
    )


# Shown only when a task reports more than its primary metric and loss (per class, per region, in mm).
BOOKKEEPING = {"round", "num-examples", "eval_seconds", "loss"}
# Beyond this many metrics (per class and region) the table turns: metrics down, sites across.
WIDE_TABLE = 8


def _metrics_table(summary: dict[str, Any]) -> str:
    table: dict[str, Any] = summary.get("sites") or {}
    rows = {site: (row or {}).get("federated") or {} for site, row in table.items()}
    keys = sorted({key for metrics in rows.values() for key in metrics} - BOOKKEEPING)
    if len(keys) <= 2:
        return ""
    note = (
        '<h3>Federated model, every metric</h3>\n<p class="muted">Scan geometry: computed on each case\'s own grid '
        "after inverting the preprocessing; hd95 and msd in millimetres, as the mean over the classes and per class "
        "and region (hd95_&lt;class&gt;), as Dice.</p>\n"
    )
    if len(keys) > WIDE_TABLE:  # per class and region: one row per metric, one column per site
        head = "".join(f"<th>{html.escape(str(site))}</th>" for site in rows)
        body = "".join(
            f"<tr><td>{html.escape(key)}</td>{''.join(_cell(metrics.get(key)) for metrics in rows.values())}</tr>"
            for key in keys
        )
        return f"{note}<table><tr><th>metric</th>{head}</tr>{body}</table>\n"
    head = "".join(f"<th>{html.escape(key)}</th>" for key in keys)
    body = "".join(
        f"<tr><td>{html.escape(str(site))}</td>{''.join(_cell(metrics.get(key)) for key in keys)}</tr>"
        for site, metrics in rows.items()
    )
    return f"{note}<table><tr><th>site</th>{head}</tr>{body}</table>\n"


def _summary_table(summary: dict[str, Any]) -> str:
    table: dict[str, Any] = summary.get("sites") or {}
    if not table:
        return "<p>No evaluation results.</p>"
    metric = summary.get("primary_metric", "loss")
    head = "".join(f"<th>{html.escape(_column_label(column))}</th>" for column in COLUMNS)
    # Which model each site delivers: chosen on its tuning split, never on the validation data scored here.
    chooses = any((row or {}).get("delivered_model") for row in table.values())
    head += "<th>delivered model</th>" if chooses else ""
    body = []
    for site, row in table.items():
        cells = "".join(_cell(((row or {}).get(column) or {}).get(metric)) for column in COLUMNS)
        cells += f"<td>{html.escape(str((row or {}).get('delivered_model') or '-'))}</td>" if chooses else ""
        body.append(f"<tr><td>{html.escape(str(site))}</td>{cells}</tr>")
    for label in ("mean", "worst_site"):
        cells = "".join(_cell((summary.get(column) or {}).get(label)) for column in COLUMNS)
        cells += "<td></td>" if chooses else ""
        body.append(f"<tr><td><b>{label.replace('_', ' ')}</b></td>{cells}</tr>")
    return f"<table><tr><th>site</th>{head}</tr>{''.join(body)}</table>"


# Cross-site evaluation -------------------------------------------------------------------------
def _cross_site_section(cross_site: dict[str, Any], *, heatmap: Path | None) -> str:
    evaluation = plots.pick_evaluation(cross_site)
    if evaluation is None:
        return '<h2>Cross-site evaluation</h2>\n<p class="muted">Not recorded for this run (no cross_site.json).</p>\n'
    metric = str(cross_site.get("metric", "metric"))
    direction = "lower" if cross_site.get("higher_is_better", True) is False else "higher"
    models, sites, values = plots.cross_site_matrix(evaluation, metric=metric)
    when = f"round {evaluation.get('round', '?')}" + (" (final)" if evaluation.get("final") else "")
    return f"""<h2>Cross-site evaluation</h2>
<p>Rows are models, columns are the validation data of each site: a cell is how that model scores on that
site's data ({html.escape(metric)}, {direction} is better; brighter cells are better either way). A personalized or
local-only model on its own site is its home score; on the other sites it shows how well it travels.
Grey <i>n/a</i>: the pair was not evaluated (a site that keeps its personalized model private evaluates it only
on its own data).</p>
<p class="muted">Shown: {html.escape(when)}.</p>
{_image(heatmap, alt=f"cross-site {metric}: models by site")}
<details><summary>values as a table</summary>{_matrix_table(models, sites, values)}</details>
{_cross_site_rounds_table(cross_site, metric=metric)}
"""


def _matrix_table(models: list[str], sites: list[str], values: list[list[float]]) -> str:
    head = "".join(f"<th>{html.escape(site)}</th>" for site in sites)
    body = "".join(
        f"<tr><td>{html.escape(model)}</td>{''.join(_cell(value) for value in row)}</tr>"
        for model, row in zip(models, values)
    )
    return f"<table><tr><th>model \\ data of</th>{head}</tr>{body}</table>"


def home_means(evaluation: dict[str, Any], *, metric: str) -> dict[str, float]:
    """Per model group, the mean score where each model is meant to be used.

    'personalized:site-a' counts only on site-a's data (its home); a model without a site ('global') counts on
    every site. Groups keep the order in which their first model is listed.
    """
    models, sites, values = plots.cross_site_matrix(evaluation, metric=metric)
    scores: dict[str, list[float]] = {}
    for model, row in zip(models, values):
        group, _, home = model.partition(":")
        cells = [row[sites.index(home)]] if home in sites else ([] if home else row)
        scores.setdefault(group, []).extend(v for v in cells if not math.isnan(v))
    return {group: sum(v) / len(v) if v else math.nan for group, v in scores.items()}


def _cross_site_rounds_table(cross_site: dict[str, Any], *, metric: str) -> str:
    evaluations = [e for e in cross_site.get("evaluations") or [] if isinstance(e, dict)]
    if len(evaluations) < 2:
        return ""
    by_round = [(evaluation.get("round", "?"), home_means(evaluation, metric=metric)) for evaluation in evaluations]
    groups: list[str] = []
    for _, means in by_round:
        groups += [group for group in means if group not in groups]
    head = "".join(f"<th>{html.escape(group)}</th>" for group in groups)
    body = "".join(
        f"<tr><td>{html.escape(str(server_round))}</td>{''.join(_cell(means.get(group)) for group in groups)}</tr>"
        for server_round, means in by_round
    )
    return (
        f"<p>Mean {html.escape(metric)} over the sites where each model is used (global: every site; "
        f"personalized and local-only: their own site), per evaluation:</p>"
        f"<table><tr><th>round</th>{head}</tr>{body}</table>"
    )


# Learning curves, privacy ----------------------------------------------------------------------
def _learning_curves_section(curves: list[Path | None]) -> str:
    images = "\n".join(_image(figure, alt=figure.stem.replace("_", " ")) for figure in curves if figure)
    return "<h2>Learning curves</h2>\n" + (images or '<p class="muted">No metrics recorded.</p>') + "\n"


def _privacy_section(summary: dict[str, Any]) -> str:
    client = summary.get("client_privacy")
    client_line = f"<h2>Client-level DP</h2>\n<p>{html.escape(describe_client_privacy(client))}</p>\n" if client else ""
    return client_line + _dp_sgd_section(summary)


def _dp_sgd_section(summary: dict[str, Any]) -> str:
    privacy: dict[str, Any] = summary.get("privacy") or {}
    if not privacy:
        # "Privacy spent" is kept for runs that reported a spend, so the heading alone says DP-SGD was on.
        return '<h2>Privacy</h2>\n<p class="muted">No DP-SGD spend recorded for this run.</p>\n'
    rows = "".join(
        f"<tr><td>{html.escape(str(site))}</td>{_cell(spent.get('epsilon'))}{_cell(spent.get('epsilon_budget'))}"
        f"{_cell(spent.get('delta'), digits='.0e')}{_cell(spent.get('noise_multiplier'))}</tr>"
        for site, spent in privacy.items()
        if isinstance(spent, dict)
    )
    return (
        "<h2>Privacy spent (DP-SGD, per site)</h2><table><tr><th>site</th><th>ε spent</th><th>ε budget</th>"
        f"<th>δ</th><th>noise multiplier</th></tr>{rows}</table>\n"
    )


# Participation -----------------------------------------------------------------------------------
def _participation_section(rounds: list[dict[str, Any]], *, status: dict[str, Any]) -> str:
    """The run's state and every round some site missed: dropped (no reply) or refused (with its reason)."""
    state = html.escape(str(status.get("state") or "unknown"))
    reason = f" ({html.escape(str(status['reason']))})" if status.get("reason") else ""
    head = f"<h2>Participation</h2>\n<p>Run state: <b>{state}</b>{reason}; {len(rounds)} round(s) recorded.</p>\n"
    missed = [row for row in rounds if row.get("sites_dropped") or row.get("sites_refused")]
    if not missed:
        return head + '<p class="muted">No site dropped out of or refused a recorded round.</p>\n'
    body = "".join(
        f"<tr><td>{html.escape(str(row.get('round')))}</td>"
        f"<td>{html.escape(', '.join(row.get('sites_trained', [])))}</td>"
        f"<td>{html.escape(', '.join(row.get('sites_dropped', [])))}</td>"
        f"<td>{_refusals(row.get('sites_refused', {}))}</td></tr>"
        for row in missed
    )
    return head + (
        "<table><tr><th>round</th><th>trained</th><th>dropped (no reply)</th><th>refused (reason)</th></tr>"
        f"{body}</table>\n"
    )


def _refusals(refused: dict[str, str]) -> str:
    return "<br>".join(html.escape(f"{site}: {reason}") for site, reason in refused.items())


# Intensity normalization -----------------------------------------------------------------------
def _normalization_section(normalization: dict[str, Any], *, figure: Path | None) -> str:
    if not normalization:
        return (
            '<h2>Intensity normalization</h2>\n<p class="muted">Not recorded for this run '
            "(no normalization.json).</p>\n"
        )
    method = html.escape(str(normalization.get("method") or "none"))
    details = []
    if normalization.get("foreground"):
        details.append(f"foreground: {html.escape(str(normalization['foreground']))}")
    landmarks = normalization.get("standard_landmarks")
    if isinstance(landmarks, list) and landmarks:
        details.append(f"{len(landmarks)} standard landmarks")
    sites = normalization.get("sites") if isinstance(normalization.get("sites"), dict) else {}
    images = sum(
        entry.get("num_images", 0)
        for entry in sites.values()
        if isinstance(entry, dict) and isinstance(entry.get("num_images"), int)
    )
    details.append(f"{len(sites)} sites, {images} images")
    caption = (
        (
            "<p>Each line is one site's histogram of foreground intensities, scaled to area 1: left as the "
            "scanners wrote them, right as the model sees them. After normalization the sites should overlap."
            "</p>"
        )
        if figure
        else '<p class="muted">No histograms recorded.</p>'
    )
    return (
        f"<h2>Intensity normalization</h2>\n<p>Method: <b>{method}</b> ({'; '.join(details)})</p>\n"
        f"{caption}\n{_image(figure, alt='foreground intensity histograms before and after normalization')}\n"
    )


def _cell(value: Any, *, digits: str = ".3f") -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "<td>–</td>"
    if math.isnan(value):
        return '<td class="na">n/a</td>'
    return f"<td>{value:{digits}}</td>"

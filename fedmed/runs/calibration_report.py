"""The run report's calibration and out-of-distribution section, from the run's model card (model_card.json)."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from .model_card import ALL_SITES, ModelCard, ModelCardError, read_model_card


def calibration_section(run_dir_path: Path, *, plot_dir: Path) -> str:
    """ECE before and after temperature scaling per site, the pooled reliability diagram (SVG) and the OOD
    threshold; a short note when the run has no model card."""
    try:
        card = read_model_card(run_dir_path)
    except ModelCardError as error:
        return f'<h2>Calibration</h2>\n<p class="muted">{html.escape(str(error))}</p>\n'
    if card is None:
        return '<h2>Calibration</h2>\n<p class="muted">Not recorded for this run (no model_card.json).</p>\n'
    figure = reliability_diagram(card, path=plot_dir / "reliability.svg")
    temperature = "none fitted" if card.temperature is None else f"T = {card.temperature:.3g}"
    threshold = "none" if card.ood_threshold is None else f"{card.ood_threshold:.3g}"
    notes = "".join(f"<li>{html.escape(note)}</li>" for note in card.notes)
    image = f'<img src="plots/{figure.name}" alt="reliability diagram before and after scaling">' if figure else ""
    return (
        "<h2>Calibration and out-of-distribution flag</h2>\n"
        "<p>Temperature scaling of the final global model, fitted on the sites' validation cases from their summed "
        f"log-likelihoods (no case left a site): <b>{html.escape(temperature)}</b>. The expected calibration error "
        "(ECE: the gap between confidence and accuracy, 15 confidence bins) is measured on the same cases before and "
        "after scaling, cross-fitted: each half of the cases is scaled with the temperature fitted on the other "
        "half.</p>\n"
        f"{_ece_table(card)}\n{image}\n"
        f"<p>OOD threshold: <b>{html.escape(threshold)}</b> (a case whose feature distance to the sites' training "
        "cases exceeds it is flagged; at most 5 % of the sites' validation cases do).</p>\n"
        + (f'<ul class="muted">{notes}</ul>\n' if notes else "")
    )


def _ece_table(card: ModelCard) -> str:
    if not card.calibration:
        return '<p class="muted">No site reported calibration (a task without class probabilities).</p>'
    rows = []
    for site, entry in card.calibration.items():
        label = f"<b>{html.escape(site)}</b>" if site == ALL_SITES else html.escape(site)
        cells = "".join(_cell(entry.get(key)) for key in ("ece_before", "ece_after"))
        rows.append(f"<tr><td>{label}</td><td>{int(entry.get('cases') or 0)}</td>{cells}</tr>")
    return (
        "<table><tr><th>site</th><th>cases assessed</th><th>ECE before</th><th>ECE after</th></tr>"
        f"{''.join(rows)}</table>"
    )


def _cell(value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        return '<td class="na">n/a</td>'
    return f"<td>{value:.4f}</td>"


def reliability_diagram(card: ModelCard, *, path: Path) -> Path | None:
    """Accuracy against confidence per bin, pooled over the sites, before and after scaling; None without bins."""
    pooled = card.calibration.get(ALL_SITES) or {}
    curves = {
        label: _points(pooled.get(key))
        for label, key in (("before scaling", "bins_before"), ("after scaling", "bins_after"))
    }
    curves = {label: points for label, points in curves.items() if points}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot  # imported only when a report is drawn

    figure, axis = pyplot.subplots(figsize=(4.5, 4.5))
    axis.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect calibration")
    for (label, (confidence, accuracy)), marker in zip(curves.items(), ("o", "s"), strict=False):
        axis.plot(confidence, accuracy, marker=marker, linewidth=1.5, label=label)
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_xlabel("confidence (mean per bin)")
    axis.set_ylabel("accuracy")
    axis.set_title("reliability, all sites pooled")
    axis.legend(loc="upper left", fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="svg")
    pyplot.close(figure)
    return path


def _points(bins: Any) -> tuple[list[float], list[float]] | None:
    if not isinstance(bins, dict):
        return None
    rows = zip(bins.get("count") or [], bins.get("confidence") or [], bins.get("correct") or [], strict=False)
    filled = [(confidence / count, correct / count) for count, confidence, correct in rows if count]
    if not filled:
        return None
    return [point[0] for point in filled], [point[1] for point in filled]

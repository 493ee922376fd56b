"""The run's HTML report: plots and tables a person can open offline."""

from __future__ import annotations

import html
import math
from typing import Any

from fedmed.runs import plots
from fedmed.runs.run_dir import RunDirectory
from fedmed.runs.summary import COLUMNS

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 960px; color: #222; }
table { border-collapse: collapse; margin: 1rem 0; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.7rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5rem 0; }
.muted { color: #777; }
"""


def write_report(run_dir: RunDirectory) -> None:
    summary = run_dir.read_json("summary.json") or {}
    rows = run_dir.read_metrics()
    metric = summary.get("primary_metric", "loss")
    plot_dir = run_dir.path / "plots"
    plot_dir.mkdir(exist_ok=True)
    figures = [
        plots.learning_curves(rows, phase="evaluate", metric=metric, path=plot_dir / "learning_curves.png",
                              title=f"global model {metric} at each site"),
        plots.learning_curves(rows, phase="train", metric="train_loss", path=plot_dir / "train_loss.png",
                              title="local training loss"),
        plots.final_by_site(summary, path=plot_dir / "final_by_site.png") if summary else None,
    ]
    images = "\n".join(
        f'<img src="plots/{figure.name}" alt="{figure.stem.replace("_", " ")}">' for figure in figures if figure
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fedmed run {html.escape(run_dir.path.name)}</title>
<style>{STYLE}</style></head><body>
<h1>fedmed run <code>{html.escape(run_dir.path.name)}</code></h1>
<p class="muted">Configuration: <a href="config.toml">config.toml</a> · metrics:
<a href="metrics.csv">metrics.csv</a> · final model: <code>checkpoints/final.pt</code></p>
<h2>Federated vs local-only vs pooled ({html.escape(metric)})</h2>
{_summary_table(summary)}
{_privacy_table(summary)}
<h2>Plots</h2>
{images}
</body></html>
"""
    run_dir.report_html.write_text(page, encoding="utf-8")


def _summary_table(summary: dict[str, Any]) -> str:
    if not summary.get("sites"):
        return "<p>No evaluation results.</p>"
    metric = summary["primary_metric"]
    head = "".join(f"<th>{column.replace('_', '-')}</th>" for column in COLUMNS)
    body = []
    for site, row in summary["sites"].items():
        cells = "".join(f"<td>{_fmt((row.get(column) or {}).get(metric))}</td>" for column in COLUMNS)
        body.append(f"<tr><td>{html.escape(site)}</td>{cells}</tr>")
    for label in ("mean", "worst_site"):
        cells = "".join(f"<td>{_fmt(summary.get(column, {}).get(label))}</td>" for column in COLUMNS)
        body.append(f"<tr><td><b>{label.replace('_', ' ')}</b></td>{cells}</tr>")
    return f"<table><tr><th>site</th>{head}</tr>{''.join(body)}</table>"


def _privacy_table(summary: dict[str, Any]) -> str:
    privacy = summary.get("privacy")
    if not privacy:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(site)}</td><td>{_fmt(spent.get('epsilon'))}</td><td>{_fmt(spent.get('epsilon_budget'))}"
        f"</td><td>{spent.get('delta', float('nan')):.0e}</td><td>{_fmt(spent.get('noise_multiplier'))}</td></tr>"
        for site, spent in privacy.items()
    )
    return ("<h2>Privacy spent (DP-SGD, per site)</h2><table><tr><th>site</th><th>ε spent</th><th>ε budget</th>"
            f"<th>δ</th><th>noise multiplier</th></tr>{rows}</table>")


def _fmt(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "–"
    return "n/a" if math.isnan(value) else f"{value:.3f}"

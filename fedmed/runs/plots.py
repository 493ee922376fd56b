"""PNG figures for the run report (matplotlib, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

SITE_COLUMNS = ("federated", "local_only", "pooled")
MAX_LEGEND_SITES = 12


def _pyplot():  # noqa: ANN202 - matplotlib is imported only when a report is drawn
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curves(rows: list[dict[str, Any]], *, phase: str, metric: str, path: Path, title: str) -> Path | None:
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        if row["phase"] == phase and isinstance(row.get(metric), (int, float)):
            series.setdefault(row["site"], []).append((row["round"], float(row[metric])))
    if not series:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 3.8), dpi=100)
    many = len(series) > MAX_LEGEND_SITES
    for site, points in sorted(series.items()):
        points.sort()
        rounds, values = [p[0] for p in points], [p[1] for p in points]
        if many:  # one faint line per site and the mean on top; a legend of 100 names says nothing
            axis.plot(rounds, values, color="0.6", linewidth=0.6, alpha=0.5)
        else:
            axis.plot(rounds, values, marker="o", markersize=3, label=site)
    if many:
        by_round: dict[int, list[float]] = {}
        for points in series.values():
            for server_round, value in points:
                by_round.setdefault(server_round, []).append(value)
        rounds = sorted(by_round)
        axis.plot(rounds, [sum(by_round[r]) / len(by_round[r]) for r in rounds], color="C0", linewidth=2,
                  label=f"mean of {len(series)} sites")
    axis.set_xlabel("round")
    axis.set_ylabel(metric)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def final_by_site(summary: dict[str, Any], *, path: Path) -> Path | None:
    metric = summary["primary_metric"]
    sites = list(summary["sites"])
    columns = [c for c in SITE_COLUMNS if any(summary["sites"][s].get(c) for s in sites)]
    if not sites or not columns:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 3.8), dpi=100)
    width = 0.8 / len(columns)
    for index, column in enumerate(columns):
        values = []
        for site in sites:
            metrics = summary["sites"][site].get(column) or {}
            value = metrics.get(metric, math.nan)
            values.append(value if isinstance(value, (int, float)) else math.nan)
        positions = [i + (index - (len(columns) - 1) / 2) * width for i in range(len(sites))]
        axis.bar(positions, values, width=width, label=column.replace("_", "-"))
    if len(sites) > MAX_LEGEND_SITES:
        axis.set_xticks([])
        axis.set_xlabel(f"{len(sites)} sites")
    else:
        axis.set_xticks(range(len(sites)), sites)
    axis.set_ylabel(metric)
    axis.set_title(f"final {metric} per site")
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path

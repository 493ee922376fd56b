"""PNG figures for the run report (matplotlib, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .summary import COLUMNS

MAX_LEGEND_SITES = 12
DPI = 100
# Beyond this many cells the numbers no longer fit; the colour alone still reads.
MAX_ANNOTATED_COLUMNS = 16
MAX_ANNOTATED_ROWS = 40
MISSING_CELL_COLOUR = "0.85"


def _pyplot():  # matplotlib.pyplot, imported only when a report is drawn
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _number(value: Any) -> float:
    """A finite float, or NaN for anything else (missing entries, strings, null from JSON)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value) if math.isfinite(value) else math.nan


def _save(figure: Any, path: Path) -> Path:
    plt = _pyplot()
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return path


def learning_curves(rows: list[dict[str, Any]], *, phase: str, metric: str, path: Path, title: str) -> Path | None:
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        if row.get("phase") == phase and isinstance(row.get(metric), (int, float)):
            series.setdefault(str(row.get("site")), []).append((row["round"], float(row[metric])))
    if not series:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 3.8), dpi=DPI)
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
        axis.plot(
            rounds,
            [sum(by_round[r]) / len(by_round[r]) for r in rounds],
            color="C0",
            linewidth=2,
            label=f"mean of {len(series)} sites",
        )
    axis.set_xlabel("round")
    axis.set_ylabel(metric)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return _save(figure, path)


def final_by_site(summary: dict[str, Any], *, path: Path) -> Path | None:
    metric = summary.get("primary_metric", "loss")
    table: dict[str, dict[str, Any]] = summary.get("sites") or {}
    sites = list(table)
    columns = [c for c in COLUMNS if any((table[s] or {}).get(c) for s in sites)]
    if not sites or not columns:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 3.8), dpi=DPI)
    width = 0.8 / len(columns)
    for index, column in enumerate(columns):
        values = [_number(((table[site] or {}).get(column) or {}).get(metric)) for site in sites]
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
    # One row of legend above the bars, with headroom, so it never hides the tallest bar.
    axis.margins(y=0.18)
    axis.legend(fontsize=8, ncols=len(columns), loc="upper center", frameon=False)
    return _save(figure, path)


# Cross-site evaluation -------------------------------------------------------------------------
def pick_evaluation(cross_site: dict[str, Any]) -> dict[str, Any] | None:
    """The evaluation the report shows: the last one marked final, else the last one."""
    evaluations = [e for e in cross_site.get("evaluations") or [] if isinstance(e, dict)]
    finals = [e for e in evaluations if e.get("final")]
    chosen = finals or evaluations
    return chosen[-1] if chosen else None


def cross_site_matrix(evaluation: dict[str, Any], *, metric: str) -> tuple[list[str], list[str], list[list[float]]]:
    """Models (rows), evaluating sites (columns) and the metric per pair, NaN where the pair was not evaluated."""
    results: dict[str, Any] = evaluation.get("metrics") or {}
    models = [str(m) for m in evaluation.get("models") or results]
    sites = [str(s) for s in evaluation.get("sites") or []]
    if not sites:  # older files may list only the metrics; keep the order in which sites first appear
        for by_site in results.values():
            sites += [s for s in (by_site or {}) if s not in sites]
    values = [[_number(((results.get(model) or {}).get(site) or {}).get(metric)) for site in sites] for model in models]
    return models, sites, values


def cross_site_heatmap(cross_site: dict[str, Any], *, path: Path) -> Path | None:
    """Rows = models, columns = the site whose validation data was used; grey 'n/a' where a pair is missing."""
    evaluation = pick_evaluation(cross_site)
    if evaluation is None:
        return None
    metric = str(cross_site.get("metric", "metric"))
    models, sites, values = cross_site_matrix(evaluation, metric=metric)
    if not models or not sites or all(math.isnan(v) for row in values for v in row):
        return None
    import matplotlib
    import numpy as np

    plt = _pyplot()
    higher_is_better = cross_site.get("higher_is_better", True) is not False
    # Reversing the colormap for lower-is-better metrics keeps "good" the same (bright) colour either way.
    colormap = matplotlib.colormaps["viridis" if higher_is_better else "viridis_r"].with_extremes(
        bad=MISSING_CELL_COLOUR
    )
    grid = np.ma.masked_invalid(np.array(values, dtype=float))
    width = min(3.0 + 0.9 * len(sites), 14.0)
    height = min(1.6 + 0.38 * len(models), 16.0)
    figure, axis = plt.subplots(figsize=(width, height), dpi=DPI)
    image = axis.imshow(grid, cmap=colormap, aspect="auto", interpolation="nearest")
    bar = figure.colorbar(image, ax=axis, fraction=0.05, pad=0.02)
    bar.set_label(f"{metric} ({'higher' if higher_is_better else 'lower'} is better)")
    slanted = len(sites) > 4  # long site names collide when more than a few sit side by side
    axis.set_xticks(range(len(sites)), sites, rotation=30 if slanted else 0, ha="right" if slanted else "center")
    axis.set_yticks(range(len(models)), models)
    axis.set_xlabel("validation data of site")
    axis.set_ylabel("model")
    axis.tick_params(labelsize=8)
    round_label = evaluation.get("round")
    axis.set_title(f"cross-site {metric}" + (f", round {round_label}" if round_label is not None else ""))
    _separate_model_groups(axis, models)
    if len(sites) <= MAX_ANNOTATED_COLUMNS and len(models) <= MAX_ANNOTATED_ROWS:
        _annotate_cells(axis, values, image=image)
    return _save(figure, path)


def model_group(model: str) -> str:
    """'personalized:site-a' -> 'personalized'; 'global' -> 'global'."""
    return model.split(":", 1)[0]


def _separate_model_groups(axis: Any, models: list[str]) -> None:
    # A line between global / personalized / local-only rows so the blocks read as blocks.
    for row in range(1, len(models)):
        if model_group(models[row]) != model_group(models[row - 1]):
            axis.axhline(row - 0.5, color="white", linewidth=2)


def _annotate_cells(axis: Any, values: list[list[float]], *, image: Any) -> None:
    for row, line in enumerate(values):
        for column, value in enumerate(line):
            if math.isnan(value):
                axis.text(column, row, "n/a", ha="center", va="center", fontsize=8, color="0.35")
                continue
            red, green, blue, _ = image.cmap(image.norm(value))
            dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
            axis.text(
                column, row, f"{value:.3f}", ha="center", va="center", fontsize=8, color="white" if dark else "black"
            )


# Intensity normalization -----------------------------------------------------------------------
def _density(histogram: Any) -> tuple[list[float], list[float]] | None:
    """Bin centres and density (area 1) of one stored histogram, or None when the entry is unusable."""
    if not isinstance(histogram, dict):
        return None
    counts = [_number(c) for c in histogram.get("counts") or []]
    low, high = _number(histogram.get("low")), _number(histogram.get("high"))
    if not counts or any(math.isnan(c) for c in counts) or not high > low or sum(counts) <= 0:
        return None
    width = (high - low) / len(counts)
    total = sum(counts)
    # Densities, not counts: sites hold different numbers of voxels and the shapes are what we compare.
    return [low + (i + 0.5) * width for i in range(len(counts))], [c / (total * width) for c in counts]


def intensity_histograms(normalization: dict[str, Any], *, path: Path) -> Path | None:
    """Two panels, before and after normalization, with one line per site (faint lines + mean when many)."""
    sites: dict[str, Any] = normalization.get("sites") if isinstance(normalization.get("sites"), dict) else {}
    panels = {
        stage: {
            str(site): curve
            for site, entry in sorted(sites.items())
            if isinstance(entry, dict) and (curve := _density(entry.get(stage))) is not None
        }
        for stage in ("before", "after")
    }
    if not any(panels.values()):
        return None
    plt = _pyplot()
    method = str(normalization.get("method") or "no")
    figure, axes = plt.subplots(1, 2, figsize=(10.0, 3.8), dpi=DPI)
    titles = {"before": "before: raw scanner intensities", "after": f"after {method} normalization: model input"}
    for axis, (stage, curves) in zip(axes, panels.items()):
        axis.set_title(titles[stage], fontsize=10)
        axis.set_xlabel("intensity (foreground voxels)")
        axis.set_ylabel("density")
        axis.grid(alpha=0.3)
        if not curves:
            axis.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=axis.transAxes, color="0.4")
            continue
        # Averaging raw intensities across scanners says nothing; after normalization the mean is the shared shape.
        _draw_site_curves(axis, curves, with_mean=stage == "after")
        if stage == "before":
            _spread_scanner_ranges(axis, curves)
    landmarks = [_number(v) for v in normalization.get("standard_landmarks") or []]
    if panels["after"] and landmarks and not any(math.isnan(v) for v in landmarks):
        for value in landmarks:  # where the after-histograms should line up if normalization worked
            axes[1].axvline(value, color="0.5", linewidth=0.6, linestyle=":")
    return _save(figure, path)


def _spread_scanner_ranges(axis: Any, curves: dict[str, tuple[list[float], list[float]]]) -> None:
    """Scanners whose ranges differ by orders of magnitude would squash each other into spikes on a linear
    axis: switch to a symmetric log axis, linear within the narrowest site's range."""
    spans = [centres[-1] - centres[0] for centres, _ in curves.values() if len(centres) > 1]
    extent = max(c[-1] for c, _ in curves.values()) - min(c[0] for c, _ in curves.values())
    if spans and min(spans) > 0 and extent > 20 * min(spans):
        axis.set_xscale("symlog", linthresh=min(spans))
        axis.set_xlabel("intensity (foreground voxels, symmetric log scale)")


def _draw_site_curves(axis: Any, curves: dict[str, tuple[list[float], list[float]]], *, with_mean: bool) -> None:
    if len(curves) <= MAX_LEGEND_SITES:
        for site, (centres, density) in curves.items():
            axis.plot(centres, density, linewidth=1.2, label=site)
        axis.legend(fontsize=7)
        return
    import numpy as np

    # Too many sites for a legend: faint lines show the spread, the mean on a common grid shows the centre.
    for centres, density in curves.values():
        axis.plot(centres, density, color="0.5", linewidth=0.6, alpha=0.5)
    axis.plot([], [], color="0.5", linewidth=0.6, label=f"{len(curves)} sites, one line each")
    if with_mean:
        start = min(c[0][0] for c in curves.values())
        stop = max(c[0][-1] for c in curves.values())
        grid = np.linspace(start, stop, 256)
        stacked = [np.interp(grid, centres, density, left=0.0, right=0.0) for centres, density in curves.values()]
        axis.plot(grid, np.mean(stacked, axis=0), color="C0", linewidth=2, label="mean")
    axis.legend(fontsize=7)


# Site contributions ------------------------------------------------------------------------------
def outlier_scores(
    series: dict[str, list[tuple[int, float]]],
    *,
    quarantined: dict[str, list[int]],
    threshold: float,
    path: Path,
) -> Path | None:
    """Each site's outlier score per round, the flag threshold as a line, and a red cross on every round a
    site spent in quarantine (at its score, or on the threshold when it sent none that round)."""
    finite = {site: [(r, v) for r, v in sorted(points) if math.isfinite(v)] for site, points in series.items()}
    finite = {site: points for site, points in finite.items() if points}
    if not finite:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7.6, 3.8), dpi=DPI)
    many = len(finite) > MAX_LEGEND_SITES
    for site, points in sorted(finite.items()):
        rounds, values = [p[0] for p in points], [p[1] for p in points]
        # With many sites only those above the line or in quarantine get a colour and a legend entry.
        notable = site in quarantined or any(v >= threshold for v in values)
        if many and not notable:
            axis.plot(rounds, values, color="0.6", linewidth=0.6, alpha=0.5)
        else:
            axis.plot(rounds, values, marker="o", markersize=3, label=site)
    crosses = [
        (server_round, dict(finite.get(site, [])).get(server_round, threshold))
        for site, rounds in quarantined.items()
        for server_round in rounds
    ]
    if crosses:
        axis.scatter(
            [c[0] for c in crosses],
            [c[1] for c in crosses],
            marker="x",
            s=60,
            color="red",
            zorder=3,
            label="quarantined",
        )
    axis.axhline(threshold, color="C3", linestyle="--", linewidth=1, label=f"flag threshold ({threshold:g})")
    top = max(v for points in finite.values() for _, v in points)
    if top > 10 * threshold:  # one wild site would flatten the honest ones against zero on a linear axis
        axis.set_yscale("symlog", linthresh=threshold)
        axis.set_ylim(0, top * 2)
    else:
        axis.set_ylim(0, max(top, threshold) * 1.15)
    _whole_rounds(axis)
    axis.set_xlabel("round")
    axis.set_ylabel("outlier score")
    axis.set_title("each site's update against the others'")
    axis.grid(alpha=0.3)
    # Beside the axes: a flagged site's line climbs into the corner a legend would take.
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(figure, path)


def _whole_rounds(axis: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.xaxis.set_major_locator(MaxNLocator(integer=True))


def aggregate_norms(points: list[tuple[Any, Any, Any]], *, path: Path) -> Path | None:
    """Secure aggregation: the aggregated update's norm per round against the bound each site enforced."""
    rows = sorted((int(r), _number(norm), _number(bound)) for r, norm, bound in points if isinstance(r, int))
    if not rows or all(math.isnan(row[1]) for row in rows):
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 3.2), dpi=DPI)
    rounds = [row[0] for row in rows]
    axis.plot(rounds, [row[1] for row in rows], marker="o", markersize=3, label="norm of the aggregated update")
    if not all(math.isnan(row[2]) for row in rows):
        axis.plot(rounds, [row[2] for row in rows], color="C3", linestyle="--", label="update norm bound")
    axis.set_xlabel("round")
    axis.set_ylabel("L2 norm")
    axis.set_title("aggregated update's norm against the bound")
    axis.set_ylim(bottom=0)
    _whole_rounds(axis)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return _save(figure, path)

"""The run report: every figure it links exists as a PNG, and the page renders in a real headless browser."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from browser import CONSOLE_LINE, run_chromium
from matplotlib import image as mpimg

from fedmed.runs import plots
from fedmed.runs.report import home_means, write_report
from fedmed.runs.run_dir import RunDirectory
from fedmed.runs.summary import COLUMNS

SITES = ("site-a", "site-b", "site-c")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SECTION_ORDER = ("Cross-site evaluation", "Learning curves", "Privacy", "Intensity normalization")
# The grey matplotlib draws for a masked (missing) heatmap cell: plots.MISSING_CELL_COLOUR = "0.85".
MISSING_GREY = round(0.85 * 255)


# Run directory written by hand, in the shapes the writers of each file produce ---------------
def _metrics_rows() -> list[dict[str, Any]]:
    rows = []
    for server_round in range(1, 5):
        for index, site in enumerate(SITES):
            rows.append(
                {
                    "round": server_round,
                    "site": site,
                    "phase": "train",
                    "time": 1.0 + server_round,
                    "train_loss": 1.0 / (server_round + index),
                    "epsilon": 0.5 * server_round,
                    "delta": 1e-5,
                    "epsilon_budget": 4.0,
                    "noise_multiplier": 1.1,
                }
            )
            rows.append(
                {
                    "round": server_round,
                    "site": site,
                    "phase": "evaluate",
                    "time": 1.5 + server_round,
                    "dice": 0.5 + 0.1 * server_round - 0.05 * index,
                    "loss": 0.6 - 0.1 * server_round,
                }
            )
    return rows


def _summary() -> dict[str, Any]:
    sites = {
        site: {
            column: {"dice": 0.8 - 0.05 * index + 0.01 * position, "loss": 0.2}
            for position, column in enumerate(COLUMNS)
        }
        for index, site in enumerate(SITES)
    }
    sites["site-c"][COLUMNS[-1]] = None  # a baseline that was not run for one site
    summary: dict[str, Any] = {"primary_metric": "dice", "higher_is_better": True, "sites": sites}
    for column in COLUMNS[:-1]:
        values = [sites[site][column]["dice"] for site in SITES]
        summary[column] = {"mean": sum(values) / len(values), "worst_site": min(values)}
    summary["privacy"] = {
        site: {"epsilon": 2.0, "delta": 1e-5, "epsilon_budget": 4.0, "noise_multiplier": 1.1} for site in SITES
    }
    return summary


def _histogram(*, centre: float, spread: float, low: float, high: float, bins: int = 32) -> dict[str, Any]:
    edges = np.linspace(low, high, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    counts = np.round(1000 * np.exp(-0.5 * ((centres - centre) / spread) ** 2)).astype(int)
    return {"counts": counts.tolist(), "low": low, "high": high}


def _normalization() -> dict[str, Any]:
    sites: dict[str, Any] = {}
    for index, site in enumerate(SITES):
        scale = 400.0 * (index + 1)  # scanners disagree by a factor of three before normalization
        sites[site] = {
            "num_images": 10 + index,
            "before": _histogram(centre=0.5 * scale, spread=0.1 * scale, low=0.0, high=scale),
            "after": _histogram(centre=0.5, spread=0.1 + 0.01 * index, low=0.0, high=1.0),
        }
    del sites["site-c"]["after"]  # a site that has not reported its normalized histogram yet
    return {"method": "nyul", "foreground": "mean", "standard_landmarks": [i / 10 for i in range(11)], "sites": sites}


def _cross_site_metrics(*, shift: float) -> dict[str, Any]:
    models = ["global"] + [f"personalized:{s}" for s in SITES] + [f"local-only:{s}" for s in SITES]
    metrics: dict[str, dict[str, Any]] = {}
    for row, model in enumerate(models):
        metrics[model] = {}
        for column, site in enumerate(SITES):
            home = model.endswith(site)
            dice = 0.6 + shift + (0.25 if home else 0.0) - 0.02 * row + 0.01 * column
            metrics[model][site] = {"dice": dice, "hd95": 10 * (1 - dice)}
    # site-c keeps its personalized model private: it is evaluated on site-c's data only.
    metrics["personalized:site-c"] = {"site-c": metrics["personalized:site-c"]["site-c"]}
    return {"round": 0, "final": False, "models": models, "sites": list(SITES), "metrics": metrics}


def _cross_site() -> dict[str, Any]:
    early = {**_cross_site_metrics(shift=-0.2), "round": 2}
    final = {**_cross_site_metrics(shift=0.0), "round": 4, "final": True}
    return {"metric": "dice", "higher_is_better": True, "evaluations": [early, final]}


def _write_run(root: Path) -> RunDirectory:
    run_dir = RunDirectory.create(root, "report-test")
    run_dir.append_metrics(_metrics_rows())
    run_dir.write_json("summary.json", _summary())
    run_dir.write_json("normalization.json", _normalization())
    run_dir.write_json("cross_site.json", _cross_site())
    write_report(run_dir)
    return run_dir


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> RunDirectory:
    return _write_run(tmp_path_factory.mktemp("runs"))


def _image_sources(page: str) -> list[str]:
    return re.findall(r'<img [^>]*src="([^"]+)"', page)


def _assert_png(path: Path) -> None:
    assert path.is_file(), f"{path} is linked from the report but was not written"
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert len(data) > 5_000, f"{path} is only {len(data)} bytes: an empty figure?"
    pixels = mpimg.imread(path)
    assert pixels.std() > 0.05, f"{path} is a blank image"


# The page and its figures ----------------------------------------------------------------------
def test_every_linked_figure_is_a_png_beside_the_report(report: RunDirectory) -> None:
    page = report.report_html.read_text(encoding="utf-8")
    sources = _image_sources(page)
    assert sorted(sources) == sorted(
        f"plots/{name}.png"
        for name in ("final_by_site", "cross_site", "learning_curves", "train_loss", "intensity_histograms")
    )
    for source in sources:
        _assert_png(report.path / source)


def test_sections_come_in_reading_order(report: RunDirectory) -> None:
    headings = re.findall(r"<h2>(.*?)</h2>", report.report_html.read_text(encoding="utf-8"))
    assert " vs ".join(c.replace("_", "-") for c in COLUMNS).lower() in headings[0].lower()
    assert [next(i for i, h in enumerate(headings) if h.startswith(s)) for s in SECTION_ORDER] == [1, 2, 3, 4]


def test_page_is_self_contained(report: RunDirectory) -> None:
    page = report.report_html.read_text(encoding="utf-8")
    assert not re.search(r"https?:|//[a-z]", page, re.IGNORECASE), "the report must open offline"
    for link in re.findall(r'(?:src|href)="([^"]+)"', page):
        assert not Path(link).is_absolute() and ".." not in link, link


def test_missing_cross_site_pair_reads_as_not_available(report: RunDirectory) -> None:
    page = report.report_html.read_text(encoding="utf-8")
    values = page[page.index("<details>") : page.index("</details>")]
    row = re.search(r"<tr><td>personalized:site-c</td>(.*?)</tr>", values).group(1)
    home = _cross_site()["evaluations"][-1]["metrics"]["personalized:site-c"]["site-c"]["dice"]
    assert re.findall(r"<td[^>]*>([^<]*)</td>", row) == ["n/a", "n/a", f"{home:.3f}"]
    assert "Shown: round 4 (final)" in page


def test_heatmap_paints_missing_pairs_grey(tmp_path: Path) -> None:
    complete = _cross_site()
    complete["evaluations"][-1] = {**_cross_site_metrics(shift=0.0), "final": True}
    complete["evaluations"][-1]["metrics"]["personalized:site-c"] = {site: {"dice": 0.7} for site in SITES}

    def grey_pixels(cross_site: dict[str, Any], name: str) -> int:
        path = plots.cross_site_heatmap(cross_site, path=tmp_path / name)
        rgb = np.round(mpimg.imread(path)[..., :3] * 255).astype(int)
        return int(np.all(np.abs(rgb - MISSING_GREY) <= 1, axis=-1).sum())

    assert grey_pixels(_cross_site(), "missing.png") > 20 * grey_pixels(complete, "complete.png") + 1_000


def test_heatmap_uses_last_final_evaluation_and_handles_lower_is_better(tmp_path: Path) -> None:
    cross_site = _cross_site()
    cross_site["evaluations"].append({**_cross_site_metrics(shift=0.1), "round": 5, "final": False})
    assert plots.pick_evaluation(cross_site)["round"] == 4
    del cross_site["evaluations"][1]["final"]
    assert plots.pick_evaluation(cross_site)["round"] == 5, "without a final evaluation the last one is shown"
    lower = {"metric": "hd95", "higher_is_better": False, "evaluations": cross_site["evaluations"]}
    _assert_png(plots.cross_site_heatmap(lower, path=tmp_path / "hd95.png"))


def test_home_means_score_each_model_where_it_is_used() -> None:
    evaluation = _cross_site()["evaluations"][-1]
    metrics = evaluation["metrics"]
    means = home_means(evaluation, metric="dice")
    assert list(means) == ["global", "personalized", "local-only"]
    assert means["global"] == pytest.approx(sum(metrics["global"][s]["dice"] for s in SITES) / 3)
    home = [metrics[f"personalized:{s}"][s]["dice"] for s in SITES]
    assert means["personalized"] == pytest.approx(sum(home) / 3)


def test_escapes_names_from_the_run_files(tmp_path: Path) -> None:
    hostile = '<img src=x onerror="alert(1)">'
    run_dir = RunDirectory.create(tmp_path, "escape")
    cross_site = _cross_site()
    cross_site["evaluations"][-1]["models"].append(hostile)
    cross_site["evaluations"][-1]["metrics"][hostile] = {"site-a": {"dice": 0.5}}
    run_dir.write_json("cross_site.json", cross_site)
    run_dir.write_json("normalization.json", {**_normalization(), "method": hostile})
    page = write_report(run_dir).read_text(encoding="utf-8")
    assert hostile not in page
    assert html_escaped(hostile) in page


def html_escaped(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def test_report_without_optional_files(tmp_path: Path) -> None:
    run_dir = RunDirectory.create(tmp_path, "bare")
    run_dir.append_metrics(_metrics_rows())
    page = write_report(run_dir).read_text(encoding="utf-8")
    assert "no cross_site.json" in page and "no normalization.json" in page
    assert "Privacy spent" not in page, "the spend is read from summary.json, absent here"
    assert sorted(_image_sources(page)) == ["plots/learning_curves.png", "plots/train_loss.png"]


def test_report_with_unusable_entries(tmp_path: Path) -> None:
    run_dir = RunDirectory.create(tmp_path, "broken")
    run_dir.write_json("cross_site.json", {"metric": "dice", "evaluations": [{"round": 1, "metrics": {}}]})
    run_dir.write_json(
        "normalization.json",
        {
            "method": "zscore",
            "sites": {
                "site-a": {"before": {"counts": [], "low": 0, "high": 1}},
                "site-b": {"after": {"counts": [1, 2], "low": 1.0, "high": 1.0}},
                "site-c": None,
            },
        },
    )
    page = write_report(run_dir).read_text(encoding="utf-8")
    assert _image_sources(page) == []
    assert "No histograms recorded" in page and "Method: <b>zscore</b>" in page


def test_many_sites_stay_legible(tmp_path: Path) -> None:
    sites = {
        f"site-{i:02d}": {
            "num_images": 5,
            "before": _histogram(centre=50.0 * i, spread=10.0 * i, low=0.0, high=100.0 * i),
            "after": _histogram(centre=0.5, spread=0.1 + 0.002 * i, low=0.0, high=1.0),
        }
        for i in range(3, 33)
    }
    _assert_png(plots.intensity_histograms({"method": "nyul", "sites": sites}, path=tmp_path / "many.png"))


# In a real browser -----------------------------------------------------------------------------
def _dump_dom(chromium: Path, page: Path, scratch: Path) -> tuple[str, list[str]]:
    stdout, stderr = run_chromium(chromium, page, extra=["--dump-dom"], scratch=scratch)
    return stdout, CONSOLE_LINE.findall(stderr)


def test_browser_loads_every_figure_without_console_errors(
    report: RunDirectory, chromium: Path, tmp_path: Path
) -> None:
    total = len(_image_sources(report.report_html.read_text(encoding="utf-8")))
    dom, console = _dump_dom(chromium, report.report_html, tmp_path)
    # The report writes nothing to the console, so any message (error, uncaught exception) is a fault.
    assert console == [], f"console messages: {console}"
    assert f'data-figures="{total}/{total}"' in dom, re.search(r"<body[^>]*>", dom).group(0)
    assert 'class="figure-missing"' not in dom


def _blank_screenshot(shot: Path) -> str | None:
    """Why the screenshot looks blank, or None when it shows a page with figures."""
    pixels = mpimg.imread(shot)[..., :3]
    colours = len(np.unique(np.round(pixels.reshape(-1, 3) * 255).astype(np.uint8), axis=0))
    not_white = float((pixels.min(axis=-1) < 0.95).mean())
    if pixels.std() > 0.05 and colours > 500 and not_white > 0.05:
        return None
    return f"std {pixels.std():.3f}, {colours} colours, {not_white:.1%} of pixels not white"


def test_browser_screenshot_is_not_blank(report: RunDirectory, chromium: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    run_chromium(
        chromium, report.report_html, extra=[f"--screenshot={shot}", "--window-size=1200,2400"], scratch=tmp_path
    )
    assert mpimg.imread(shot).shape[:2] == (2400, 1200)
    assert _blank_screenshot(shot) is None, f"screenshot looks blank: {_blank_screenshot(shot)}"


def test_browser_reports_a_copy_without_its_plots(report: RunDirectory, chromium: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copied" / "report.html"
    copy.parent.mkdir()
    shutil.copy(report.report_html, copy)
    total = len(_image_sources(copy.read_text(encoding="utf-8")))
    dom, console = _dump_dom(chromium, copy, tmp_path)
    assert f'data-figures="0/{total}"' in dom
    assert len(re.findall(r'class="figure-missing">figure missing: plots/\w+\.png<', dom)) == total
    assert console == []


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ('console.error("deliberate failure")', "deliberate failure"),
        ("notDefinedAnywhere()", "Uncaught ReferenceError"),
    ],
)
def test_console_errors_are_detected(chromium: Path, tmp_path: Path, script: str, expected: str) -> None:
    page = tmp_path / "bad.html"
    page.write_text(f"<!DOCTYPE html><html><body><p>x</p><script>{script}</script></body></html>", encoding="utf-8")
    _, console = _dump_dom(chromium, page, tmp_path)
    assert len(console) == 1 and expected in console[0], console


def test_screenshot_check_rejects_a_blank_page(chromium: Path, tmp_path: Path) -> None:
    page = tmp_path / "blank.html"
    page.write_text("<!DOCTYPE html><html><body><p>only a line of text</p></body></html>", encoding="utf-8")
    shot = tmp_path / "blank.png"
    run_chromium(chromium, page, extra=[f"--screenshot={shot}", "--window-size=1200,2400"], scratch=tmp_path)
    assert _blank_screenshot(shot) is not None


def test_browser_renders_the_report_of_a_real_run(chromium: Path, tmp_path: Path) -> None:
    """A simulated FedBN + Nyúl run with baselines: the report the user gets, in the browser."""
    from fedmed.config import run_config_from_dict
    from fedmed.workflows.simulate import simulate

    size = [32, 32]
    config = run_config_from_dict(
        {
            "name": "browser",
            "output_dir": str(tmp_path / "runs"),
            "task": {"kind": "segmentation", "image_size": size, "intensity": "nyul"},
            "model": {"channels": [8, 16]},
            "train": {"rounds": 2, "local_epochs": 1},
            "strategy": {"fedbn": True},
            "baselines": {"local_only": True, "pooled": True},
            "synth": {
                "task": "segmentation",
                "image_size": size,
                "train_cases": 4,
                "val_cases": 2,
                "sites": [{"name": "a"}, {"name": "b", "intensity_scale": 3.0, "intensity_offset": 50.0}],
            },
        },
        base=tmp_path,
    )
    run = simulate(config).run_dir
    page = run.report_html.read_text(encoding="utf-8")
    total = len(_image_sources(page))
    # five PNGs and the model card's reliability diagram (SVG), and the outlier scores when the rounds recorded them
    measured = any("contributions" in row for row in run.read_rounds())
    assert total == 6 + measured and all(section in page for section in SECTION_ORDER)
    assert ("plots/contribution_scores.png" in page) == measured
    dom, console = _dump_dom(chromium, run.report_html, tmp_path / "dom")
    assert console == [], f"console messages: {console}"
    assert f'data-figures="{total}/{total}"' in dom
    shot = tmp_path / "shot" / "report.png"
    run_chromium(
        chromium, run.report_html, extra=[f"--screenshot={shot}", "--window-size=1200,2400"], scratch=shot.parent
    )
    assert _blank_screenshot(shot) is None, f"screenshot looks blank: {_blank_screenshot(shot)}"


def test_per_class_surface_distances_turn_the_metrics_table_to_one_row_per_metric() -> None:
    from fedmed.runs.report import _metrics_table

    names = ["oedema", "core", "whole_lesion"]
    metrics = {"dice": 0.7, "hd95": 4.0, "msd": 1.0, "loss": 0.3}
    metrics |= {f"{kind}_{name}": 1.5 for kind in ("dice", "hd95", "msd") for name in names}
    summary = {"sites": {site: {"federated": dict(metrics)} for site in SITES}}
    table = _metrics_table(summary)
    assert "<tr><th>metric</th><th>site-a</th><th>site-b</th><th>site-c</th></tr>" in table
    assert table.count("<tr><td>hd95_") == 3 and "<tr><td>msd_core</td>" in table and "<tr><td>loss" not in table
    narrow = _metrics_table({"sites": {"site-a": {"federated": {"dice": 0.7, "hd95": 4.0, "msd": 1.0}}}})
    assert "<tr><th>site</th><th>dice</th><th>hd95</th><th>msd</th></tr>" in narrow

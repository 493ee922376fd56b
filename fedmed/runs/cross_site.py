"""The cross-site evaluation record: every model's scores on every site's validation data.

Models are named `global`, or `group:site` for a model that belongs to a site (its home), such as
`personalized:hospital-a` or `local-only:hospital-a`; the report scores each at its home.
"""

from __future__ import annotations

from typing import Any

from .run_dir import CROSS_SITE_FILE, RunDirectory

GLOBAL_MODEL = "global"


def personal_model_name(site: str) -> str:
    return f"personalized:{site}"


def local_only_model_name(site: str) -> str:
    return f"local-only:{site}"


def record_evaluation(
    run_dir: RunDirectory, evaluation: dict[str, Any], *, metric: str, higher_is_better: bool
) -> None:
    """Add (or replace, for a resumed run) the evaluation of this round in cross_site.json."""
    recorded = run_dir.read_json(CROSS_SITE_FILE) or {
        "metric": metric,
        "higher_is_better": higher_is_better,
        "evaluations": [],
    }
    recorded["evaluations"] = [entry for entry in recorded["evaluations"] if entry["round"] != evaluation["round"]]
    recorded["evaluations"].append(evaluation)
    recorded["evaluations"].sort(key=lambda entry: entry["round"])
    run_dir.write_json(CROSS_SITE_FILE, recorded)


def final_evaluation(run_dir: RunDirectory) -> dict[str, Any] | None:
    """The end-of-run evaluation, if the run made one."""
    recorded = run_dir.read_json(CROSS_SITE_FILE) or {}
    return next((entry for entry in reversed(recorded.get("evaluations", [])) if entry.get("final")), None)

"""The directory every run writes: config snapshot, per-round per-site metrics, checkpoints.

Layout:
    config.toml                resolved run config
    metrics.jsonl / .csv       one row per (round, site, phase)
    rounds.jsonl               one row per round: wall time, sites that trained or dropped
    checkpoints/latest.pt      global weights + round + strategy state (for resume)
    checkpoints/final.pt       the final global model
    sites/<site>/              site-local parameters (simulation)
    status.json, normalization.json, cross_site.json, baselines.json, summary.json
    dp_plan.json               [dp_sgd]: each site's DP-SGD plan, asked before round 1 (fedmed.flower.server.dp_plan)
    starting_point.json        where the run started (random, [pretrain], model.init's file and sha256), model.freeze
    pretrain/                  [pretrain]: pretrained.pt (the starting weights) and pretrain.json (settings, metric)
    report.html, plots/
    tensorboard/               per-round scalars as TensorBoard event files (fedmed.runs.tracking)
    mlruns/                    the same in an MLflow file store, when [tracking] mlflow = true
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import torch

from fedmed.config import RunConfig, dump_toml
from fedmed.core.errors import FedmedError
from fedmed.core.files import atomic_path, write_text_atomic
from fedmed.core.log import logger

CHECKPOINT_FORMAT = 1

# The run's JSON documents.
STATUS_FILE = "status.json"  # running / completed / failed / interrupted, with the reason
SUMMARY_FILE = "summary.json"  # the per-site comparison (fedmed.runs.summary)
BASELINES_FILE = "baselines.json"  # local-only and pooled scores (simulation)
NORMALIZATION_FILE = "normalization.json"  # the sites' intensity summaries and Nyúl landmarks
CROSS_SITE_FILE = "cross_site.json"  # models x sites scores (fedmed.runs.cross_site)
DP_PLAN_FILE = "dp_plan.json"  # [dp_sgd]: each site's planned σ, sampling and steps, and the verdict on them
STOPPED_FILE = "stopped.json"  # deployed runs: 'fedmed stop' ended the latest submission (removed on resume)
READMIT_FILE = "readmit.json"  # quarantined sites to take back when the run resumes (fedmed run --readmit)
FLOWER_RUNS = "flower-runs.jsonl"  # deployed runs: each Flower run submitted for it, with the app's FAB hash
STARTING_POINT_FILE = "starting_point.json"  # start kind; model.init's file and sha256; model.freeze's keys
PRETRAIN_DIR = "pretrain"  # [pretrain]: the pretrained starting weights and their record (fedmed.tasks.pretrain)


class RunDirectory:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, output_dir: Path, name: str) -> RunDirectory:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(output_dir) / f"{name}-{stamp}"
        suffix = 1
        while path.exists():
            suffix += 1
            path = Path(output_dir) / f"{name}-{stamp}-{suffix}"
        path.mkdir(parents=True)
        return cls(path)

    @classmethod
    def to_resume(cls, path: Path, *, launcher: str) -> RunDirectory:
        """An unfinished run directory; `launcher` ('fedmed run', 'fedmed simulate') names the command to use."""
        run_dir = cls(Path(path))
        if not run_dir.config_file.is_file():
            raise FedmedError(f"{path}: no config.toml; give the run directory that '{launcher}' printed")
        if (run_dir.checkpoints / "final.pt").exists():
            raise FedmedError(f"{path}: this run finished; start a new one with '{launcher} CONFIG'")
        checkpoint = run_dir.load_checkpoint("latest")
        logger.info("resuming %s after round %s", run_dir.path.name, checkpoint["round"] if checkpoint else 0)
        return run_dir

    # Paths -----------------------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.path / "config.toml"

    @property
    def metrics_jsonl(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def metrics_csv(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def rounds_jsonl(self) -> Path:
        return self.path / "rounds.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def report_html(self) -> Path:
        return self.path / "report.html"

    def site_dir(self, site: str) -> Path:
        return self.path / "sites" / site

    # Config ----------------------------------------------------------------------------------
    def write_config(self, config: RunConfig) -> None:
        write_text_atomic(self.config_file, dump_toml(config))

    # Metrics ---------------------------------------------------------------------------------
    def append_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Append rows to the JSON lines and the CSV; the CSV is rewritten only when new columns appear."""
        if not rows:
            return
        with self.metrics_jsonl.open("a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, allow_nan=True) + "\n")
        columns = self._csv_columns()
        if columns is not None and all(key in columns for row in rows for key in row):
            with self.metrics_csv.open("a", newline="", encoding="utf-8") as handle:
                csv.DictWriter(handle, fieldnames=columns).writerows(rows)
        else:
            self._write_csv(self.read_metrics())

    def _csv_columns(self) -> list[str] | None:
        if not self.metrics_csv.exists():
            return None
        with self.metrics_csv.open(newline="", encoding="utf-8") as handle:
            return next(csv.reader(handle), None)

    def read_metrics(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.metrics_jsonl)

    def append_round(self, row: dict[str, Any]) -> None:
        """One line per finished round: timing and which sites took part."""
        with self.rounds_jsonl.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")

    def read_rounds(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.rounds_jsonl)

    def drop_rounds_after(self, last_round: int) -> None:
        """Forget rows of rounds after `last_round` (a resumed run re-runs them, so keeping them would
        duplicate rows). Each file is replaced atomically: a crash leaves the old or the new one."""
        for path in (self.rounds_jsonl, self.metrics_jsonl):
            rows = _read_jsonl(path)
            kept = [row for row in rows if int(row.get("round", 0)) <= last_round]
            if len(kept) != len(rows):
                write_text_atomic(path, "".join(json.dumps(row, allow_nan=True) + "\n" for row in kept))
        if self.metrics_csv.exists():
            self._write_csv(self.read_metrics())

    def _write_csv(self, rows: list[dict[str, Any]]) -> None:
        columns: list[str] = []
        for row in rows:
            columns += [key for key in row if key not in columns]
        with atomic_path(self.metrics_csv) as temporary, temporary.open("w", newline="", encoding="utf-8") as out:
            writer = csv.DictWriter(out, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

    # JSON documents --------------------------------------------------------------------------
    def write_json(self, name: str, data: Any) -> Path:
        path = self.path / name
        write_text_atomic(path, json.dumps(data, indent=2, allow_nan=True))
        return path

    def read_json(self, name: str) -> Any:
        path = self.path / name
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8", errors="replace"))
        except json.JSONDecodeError as error:
            raise RunFileError(f"{path}: not valid JSON ({error.msg}); restore it or delete the file") from None

    # Checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, name: str, payload: dict[str, Any]) -> Path:
        path = self.checkpoints / f"{name}.pt"
        with atomic_path(path) as temporary:
            torch.save({"format": CHECKPOINT_FORMAT, **payload}, temporary)
        return path

    def load_checkpoint(self, name: str) -> dict[str, Any] | None:
        path = self.checkpoints / f"{name}.pt"
        if not path.exists():
            return None
        # Our own file (strategy state holds numpy arrays, so the full unpickler is needed).
        return torch.load(path, map_location="cpu", weights_only=False)


class RunFileError(FedmedError):
    """A file of a run directory cannot be read."""


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise RunFileError(
                f"{path}: line {number} is not JSON ({error.msg}); restore the file from a backup or delete that line"
            ) from None
        if not isinstance(row, dict):
            raise RunFileError(f"{path}: line {number} is not a JSON object; delete that line")
        rows.append(row)
    return rows

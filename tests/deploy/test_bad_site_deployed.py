"""A faulty site in a real federation: site c's label export is broken (every label inverted). Its updates are
flagged from round 1 and left out, it is quarantined after robust.quarantine_after rounds and no longer asked to
train, `fedmed status` and the report say so with the evidence, and only the coordinator takes it back, by
stopping the run and resuming it with --readmit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from deploy_helpers import run_config

from fedmed.config import load_site_config
from fedmed.deploy.local import FEDMED, LocalFederation, cli, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _rounds(run_dir: Path) -> list[dict]:
    path = run_dir / "rounds.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def state(federation: LocalFederation, run_dir: Path) -> str:
    return next(run for run in federation.status()["runs"] if run["run"] == run_dir.name)["state"]


def broken_label_export(data: Path, out: Path) -> Path:
    """A copy of the site's folder whose every label map is inverted (background <-> lesion)."""
    shutil.copytree(data, out)
    for path in sorted((out / "labelsTr").glob("*.nii*")):
        image = nib.load(path)
        labels = np.asarray(image.dataobj)
        nib.save(nib.Nifti1Image((1 - labels).astype(labels.dtype), image.affine, image.header), path)
    return out


def test_a_faulty_site_is_quarantined_shown_and_readmitted_only_by_the_coordinator(
    federation: LocalFederation, tmp_path: Path
) -> None:
    clean = load_site_config(federation.site_config("c")).data
    federation.edit_site("c", data=str(broken_label_export(clean, tmp_path / "c-broken")))
    try:
        config = run_config(federation, "bad-site", train={"rounds": 30}, robust={"quarantine_after": 2})
        run_dir = federation.submit(config)
        wait_for(lambda: len(_rounds(run_dir)) >= 3, timeout=300, what="three rounds")
        first, second, third = _rounds(run_dir)[:3]
        assert first["contributions"]["c"]["flagged"] and first["contributions"]["c"]["left_out"] == "flagged"
        assert not first["contributions"]["a"]["flagged"] and not first["contributions"]["b"]["flagged"]
        assert [(e["site"], e["event"]) for e in second["quarantine_events"]] == [("c", "quarantined")]
        # Site c never counted: left out while flagged, then not even asked to train.
        assert third["sites_trained"] == ["a", "b"] and third["sites_quarantined"] == ["c"]

        entry = next(run for run in federation.status()["runs"] if run["run"] == run_dir.name)
        (held,) = entry["quarantined"]
        assert held["site"] == "c" and held["round"] == 2 and "round 1:" in held["evidence"]
        assert "--readmit c" in held["readmit"] and f"fedmed stop {run_dir.name}" in held["readmit"]
        shown = cli([FEDMED, "status", "--server", str(federation.server_config)]).stdout
        assert "QUARANTINED c since round 2" in shown and "--readmit c" in shown

        cli([FEDMED, "stop", run_dir.name, "--server", str(federation.server_config)])
        wait_for(lambda: state(federation, run_dir) == "interrupted", timeout=120, what="the run to stop")
        cli([FEDMED, "report", str(run_dir)])
        page = (run_dir / "report.html").read_text()
        assert "Site contributions" in page and "quarantined" in page
    finally:
        federation.edit_site("c", data=str(clean))
    stopped_at = len(_rounds(run_dir))
    cli(
        [FEDMED, "run", "--resume", str(run_dir), "--server", str(federation.server_config), "--readmit", "c"],
        timeout=120,
    )
    wait_for(lambda: len(_rounds(run_dir)) > stopped_at, timeout=300, what="a round after the resume")
    back = _rounds(run_dir)[stopped_at]
    assert [(e["site"], e["event"]) for e in back["quarantine_events"]] == [("c", "readmitted")]
    assert back["sites_trained"] == ["a", "b", "c"] and back["sites_quarantined"] == []
    cli([FEDMED, "stop", run_dir.name, "--server", str(federation.server_config)])
    wait_for(lambda: state(federation, run_dir) == "interrupted", timeout=120, what="the resumed run to stop")

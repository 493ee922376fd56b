"""The README's demo: three drifted sites, and federation at least as good as training alone."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_federation_beats_local_only_at_every_site(tmp_path: Path) -> None:
    fedmed = Path(sys.executable).with_name("fedmed")
    completed = subprocess.run(
        [str(fedmed), "demo", "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    (header,) = re.findall(r"^site\s{2,}(.+dice)$", completed.stdout, re.MULTILINE)
    columns = re.split(r"\s{2,}", header.strip())
    rows = re.findall(r"^(hospital-[abc])((?:\s+[\d.]+)+)$", completed.stdout, re.MULTILINE)
    assert [row[0] for row in rows] == ["hospital-a", "hospital-b", "hospital-c"], completed.stdout
    for site, cells in rows:
        dice = dict(zip(columns, map(float, cells.split()), strict=True))
        local_only = dice["local-only dice"]
        # The sites fine-tune by default: each is delivered the better of the two, the global model never changes.
        assert dice["federated dice"] >= local_only, f"{site}: {dice}"
        assert dice["delivered dice"] >= local_only, f"{site}: {dice}"
        assert 0.5 < dice["pooled dice"] <= 1.0
    assert "round 40/40" in completed.stderr
    assert (next(tmp_path.glob("demo-*")) / "report.html").exists()

    # The closing message names a command that applies the demo's model to new scans, and where a site's held-out
    # validation cases are listed (never a training site's folder); with those in the placeholder's folder it runs.
    (command,) = re.findall(r"^apply the model to new scans: (fedmed predict .+)$", completed.stdout, re.MULTILINE)
    (manifest,) = map(Path, re.findall(r'listed under "validation" in (\S+dataset\.json)\)', completed.stdout))
    new_scans = tmp_path / "new-scans"
    new_scans.mkdir()
    for entry in json.loads(manifest.read_text())["validation"]:
        image = manifest.parent / (entry["image"] if isinstance(entry, dict) else entry)
        (new_scans / image.name).symlink_to(image.resolve())
    arguments = command.replace("NEW_SCANS_FOLDER", str(new_scans)).split()
    predicted = subprocess.run([str(fedmed), *arguments[1:]], capture_output=True, text=True, timeout=300)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    out = Path(arguments[arguments.index("--out") + 1])
    assert len(list(out.glob("*_seg.nii.gz"))) == 16  # hospital-a's 16 validation cases, none of its 6 training

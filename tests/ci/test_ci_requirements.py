"""CI runs every test that needs an outside part (real data, nginx, Chromium, a bare bundle environment):
`.ci/run` sets the switches that turn their skips into failures, and the switches work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SWITCHES = [
    "FEDMED_REQUIRE_SHARED_DATA",
    "FEDMED_REQUIRE_NGINX",
    "FEDMED_REQUIRE_NFTABLES",
    "FEDMED_REQUIRE_CHROMIUM",
    "FEDMED_REQUIRE_BUNDLE_PYTHON",
]


def test_ci_turns_every_skip_for_a_missing_part_into_a_failure() -> None:
    script = (REPO_ROOT / ".ci" / "run").read_text()
    exported = " ".join(line for line in script.splitlines() if line.startswith("export "))
    missing = [switch for switch in SWITCHES if f"{switch}=1" not in exported]
    assert not missing, f".ci/run does not export {missing}"


def _real_data_test(*, require: bool) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("FEDMED_REQUIRE")}
    env["FEDMED_SHARED_DATA"] = str(REPO_ROOT / "no-such-data-folder")
    if require:
        env["FEDMED_REQUIRE_SHARED_DATA"] = "1"
    node = "tests/data/test_data_manifest.py::test_real_medmnist_files_load"
    return subprocess.run(
        [sys.executable, "-m", "pytest", node, "-q", "-p", "no:cacheprovider", "-o", "addopts="],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_real_data_test_fails_without_its_data_when_required_and_skips_otherwise() -> None:
    required = _real_data_test(require=True)
    assert required.returncode == 1 and "makes this a failure" in required.stdout, required.stdout[-2000:]
    optional = _real_data_test(require=False)
    assert optional.returncode == 0 and "2 skipped" in optional.stdout, optional.stdout[-2000:]

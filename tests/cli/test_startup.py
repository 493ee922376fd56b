"""`fedmed --help` and the light commands start in well under a second: the command line imports none of torch,
MONAI or Flower until a command needs them (each such import is deferred where it is used, and says why)."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "monai", "flwr", "fedmed.api", "fedmed.workflows.simulate")


def test_the_command_line_loads_no_heavy_package_before_a_command_runs() -> None:
    probe = f"import sys, fedmed.cli.main; print([name for name in {HEAVY!r} if name in sys.modules])"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]", f"importing fedmed.cli.main loaded {loaded.strip()}: defer it into the command"

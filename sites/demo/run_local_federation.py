"""The demo federation as real processes on this machine.

Provisions a federation (CA, TLS certificate, a key per hospital), generates the three demo
hospitals' data, starts `fedmed server start` and one `fedmed site start` per hospital on
127.0.0.1, runs the demo task through the deployment path, prints `fedmed status`, and stops
everything. The same steps a coordinator and three site admins follow on separate machines
(see ../README.md and ../../server/README.md).

    python sites/demo/run_local_federation.py [--rounds 5] [--keep FOLDER]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from importlib.resources import files
from pathlib import Path

from fedmed.config import load_run_config
from fedmed.data import synthesize_federation
from fedmed.deploy.local import FEDMED, LocalFederation, cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--keep", type=Path, help="leave the workspace and run directory in this folder")
    args = parser.parse_args()

    demo = load_run_config(Path(str(files("fedmed.resources").joinpath("demo.toml"))))
    root = args.keep.resolve() if args.keep else Path(tempfile.mkdtemp(prefix="fedmed-demo-federation-"))
    sites = synthesize_federation(demo.synth, root / "data")
    federation = LocalFederation(root, site_data={site.name: site.path for site in sites})
    federation.provision()
    print(f"workspace: {federation.workspace}")
    try:
        federation.start()
        print("coordinator and 3 hospitals connected over TLS with node authentication")
        run = demo.model_dump(
            mode="json", include={"name", "seed", "task", "model", "train", "strategy"}, exclude_none=True
        )
        run["train"]["rounds"] = args.rounds
        completed = federation.run(federation.write_run_config(run), "--wait")
        print(completed.stdout)
        print(cli([FEDMED, "status", "--server", str(federation.server_config)]).stdout)
    finally:
        federation.close()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

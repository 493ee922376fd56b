"""fedmed's task executor for Flower's SuperNode (site) and SuperLink (coordinator).

Both run Flower in `--isolation process`, and this process takes the place of Flower's SuperExec:
it runs Flower's own task loop (`run_superexec`) with an executor that adds two things.

- App approval: before Flower installs a run's app (FAB), its SHA-256 is checked against the
  approved digests in the site's or server's config, re-read for every task so an approval needs
  no restart. A refused app never has its files installed or imported; Flower sends the refusal
  back as the task's error reply, so the coordinator sees which site refused which digest.
- Warm start (sites): Flower starts a fresh ClientApp process per message, which here spends
  ~3 s importing torch and MONAI. The executor imports them once and forks each ClientApp from
  itself, so every message still runs in its own process, without the import cost.

Run by `fedmed site start` / `fedmed server start`, not by hand:
    python -m fedmed.flower.runtime.executor --role site --config site.toml --runtime-api-address 127.0.0.1:9094
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path

from fedmed.config import load_server_config, load_site_config
from fedmed.core.errors import FedmedError
from fedmed.core.lifetime import die_with_parent
from fedmed.core.log import configure_console_logging, logger
from fedmed.flower.wire import SERVER_CONFIG_ENV

POLL_INTERVAL_S = "0.2"  # Flower's default is 1 s; a loopback poll is cheap and every message waits for it


class AppNotApprovedError(FedmedError):
    """The run's app digest is not in this party's approved list."""


def approved_digests(*, role: str, config: Path) -> set[str]:
    loaded = load_site_config(config) if role == "site" else load_server_config(config)
    return set(loaded.approved_apps)


def install_approval_guard(*, role: str, config: Path, party: str) -> None:
    """Make Flower's app installation refuse FABs whose digest is not approved."""
    # The packages re-export functions under the modules' names, so fetch the modules themselves.
    runtime = importlib.import_module(
        "flwr.supernode.runtime.run_clientapp" if role == "site" else "flwr.superlink.runtime.run_serverapp"
    )

    install_from_fab = runtime.install_from_fab

    def install_if_approved(fab_content: bytes, *args: object, **kwargs: object) -> object:
        digest = hashlib.sha256(fab_content).hexdigest()
        if digest not in approved_digests(role=role, config=config):
            approve = (
                f"fedmed site approve {config} {digest}" if role == "site" else f"add it to approved_apps in {config}"
            )
            message = (
                f"{party} refused app {digest}: not among its approved apps. After confirming the app "
                f"with the coordinator, approve it with: {approve}"
            )
            logger.error("%s", message)
            raise AppNotApprovedError(message)
        logger.info("%s: running approved app %s", party, digest[:12])
        return install_from_fab(fab_content, *args, **kwargs)

    runtime.install_from_fab = install_if_approved


def run_task(*, role: str, config: Path, party: str, argv: list[str]) -> int:
    """Run one Flower task (ClientApp or ServerApp) in this process; returns its exit code."""
    install_approval_guard(role=role, config=config, party=party)
    if role == "server":  # the ServerApp finds the coordinator's state (where runs write) through it
        os.environ[SERVER_CONFIG_ENV] = str(Path(config).resolve())
    sys.argv = argv
    try:
        if role == "site":
            from flwr.supernode.cli.flwr_clientapp import flwr_clientapp as flower_main
        else:
            from flwr.superlink.cli.flwr_serverapp import flwr_serverapp as flower_main
        flower_main()
        return 0
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 1
    except BaseException:  # report and exit: this process serves one task only
        traceback.print_exc()
        return 1


def preload() -> None:
    """Import what every ClientApp needs, without starting threads (the process forks afterwards)."""
    import monai  # noqa: F401 - MONAI imports all its submodules: the bulk of a cold start
    import torch
    import torch._dynamo  # noqa: F401 - loaded lazily by the first optimizer: 1.5 s otherwise

    importlib.import_module("flwr.supernode.cli.flwr_clientapp")
    importlib.import_module("flwr.supernode.runtime.run_clientapp")

    # Here, not at module level: the deploy CLI imports this module, and these cost seconds (torch, MONAI).
    import fedmed.data
    import fedmed.flower.client.app
    import fedmed.models.registry
    import fedmed.tasks.segmentation  # noqa: F401


def make_executor(*, role: str, config: Path, party: str, warm: bool) -> object:
    from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG, TASK_TYPE_TO_COMMAND, TaskType
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
    from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResult

    task_type = TaskType.CLIENT_APP if role == "site" else TaskType.SERVER_APP

    class GuardedExecutor(SubprocessExecutor):
        """Launches this party's tasks with the approval guard, forked from a warm process if asked."""

        def __init__(self) -> None:
            self.children: set[int] = set()

        def get_eligible_capacity(self, supported_task_types: set[TaskType], **_: object) -> tuple[set, set]:
            return supported_task_types & {task_type}, set()

        def launch(self, spec: ExecutionSpec) -> LaunchResult:
            if spec.task_type != task_type:
                return LaunchResult.failed(f"{party} runs only {task_type} tasks, not {spec.task_type}")
            argv = [
                TASK_TYPE_TO_COMMAND[task_type],
                TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[task_type],
                spec.runtime_api_address,
                "--token",
                spec.token,
            ]
            if spec.insecure:
                argv.append("--insecure")
            elif spec.root_certificates_path:
                argv += ["--root-certificates", spec.root_certificates_path]
            if spec.parent_pid is not None:
                argv += ["--parent-pid", str(spec.parent_pid)]
            logger.info(
                "%s: starting a %s for task %d", party, "ClientApp" if role == "site" else "ServerApp", spec.task_id
            )
            if warm:
                executor_pid = os.getpid()
                child = os.fork()
                if child == 0:
                    code = 1
                    try:
                        # A ClientApp whose executor died has nobody to report to: it must not linger.
                        die_with_parent(parent_pid=executor_pid, signum=signal.SIGKILL)
                        code = run_task(role=role, config=config, party=party, argv=argv)
                    finally:
                        os._exit(code)
                self.children.add(child)
                return LaunchResult.accepted()
            command = [
                sys.executable,
                "-m",
                "fedmed.flower.runtime.executor",
                "--role",
                role,
                "--config",
                str(config),
                "--party",
                party,
                "--run-task",
                *argv,
            ]
            process = subprocess.Popen(
                command, preexec_fn=functools.partial(die_with_parent, parent_pid=os.getpid(), signum=signal.SIGKILL)
            )
            self.children.add(process.pid)
            return LaunchResult.accepted()

        def reconcile(self) -> None:
            for child in list(self.children):
                try:
                    finished, _ = os.waitpid(child, os.WNOHANG)
                except ChildProcessError:
                    finished = child
                if finished:
                    self.children.discard(child)

    return GuardedExecutor()


def serve(
    *,
    role: str,
    config: Path,
    party: str,
    runtime_api_address: str,
    warm: bool,
    root_certificates: Path | None,
    secret_file: Path | None,
    parent_pid: int | None,
) -> None:
    """Flower's SuperExec loop with fedmed's executor."""
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", POLL_INTERVAL_S)
    from flwr.supercore.superexec import run_superexec as superexec

    if warm:
        preload()
    executor = make_executor(role=role, config=config, party=party, warm=warm)
    superexec.get_executor = lambda *_, **__: executor  # Flower's loop, fedmed's executor
    logger.info("%s: task executor ready (%s start)", party, "warm" if warm else "cold")
    superexec.run_superexec(
        runtime_api_address=runtime_api_address,
        # A site's Runtime API is plain HTTP on loopback; the coordinator's is the SuperLink's TLS port.
        insecure=root_certificates is None,
        root_certificates_path=str(root_certificates) if root_certificates else None,
        superexec_auth_secret=secret_file.read_bytes() if secret_file else None,
        parent_pid=parent_pid,
        runtime_dependency_install=False,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=["site", "server"], required=True)
    parser.add_argument("--config", type=Path, required=True, help="site.toml or server.toml")
    parser.add_argument("--party", default=None, help="name used in log lines (default: from the config)")
    parser.add_argument("--runtime-api-address")
    parser.add_argument("--cold", action="store_true", help="start every task in a fresh interpreter")
    parser.add_argument("--root-certificates", type=Path, help="CA of a TLS Runtime API (coordinator)")
    parser.add_argument("--secret-file", type=Path)
    parser.add_argument("--parent-pid", type=int)
    parser.add_argument("--run-task", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    configure_console_logging()
    party = args.party or _party(args.role, args.config)
    if args.run_task:
        raise SystemExit(run_task(role=args.role, config=args.config, party=party, argv=args.run_task))
    if not args.runtime_api_address:
        parser.error("--runtime-api-address is required")
    serve(
        role=args.role,
        config=args.config,
        party=party,
        runtime_api_address=args.runtime_api_address,
        warm=not args.cold and args.role == "site",
        root_certificates=args.root_certificates,
        secret_file=args.secret_file,
        parent_pid=args.parent_pid,
    )


def _party(role: str, config: Path) -> str:
    if role == "site":
        return f"site {load_site_config(config).name}"
    return f"coordinator of {load_server_config(config).federation}"


if __name__ == "__main__":
    main()

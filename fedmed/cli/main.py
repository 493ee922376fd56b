"""fedmed command line entry point."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fedmed.core.errors import FedmedError
from fedmed.flower.runtime.environment import set_flower_verbosity

from . import coordinator, model
from .common import setup_logging, user_errors
from .site import site_app

if TYPE_CHECKING:
    from fedmed.config import RunConfig

app = typer.Typer(
    help="fedmed: federated learning for hospital sites (Flower + MONAI + Opacus).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(site_app, name="site")
app.add_typer(coordinator.server_app, name="server")
app.add_typer(coordinator.app_app, name="app")
app.command()(coordinator.provision)
app.command()(coordinator.run)
app.command()(coordinator.status)
app.command()(coordinator.stop)
app.command()(model.predict)
app.command()(model.export)

Overrides = Annotated[
    list[str] | None, typer.Option("--set", help="Override a config value, e.g. --set train.rounds=3 (repeatable).")
]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]


@app.command()
def demo(
    output_dir: Annotated[Path, typer.Option(help="Where the synthetic data and the run directory go.")] = Path("runs"),
    engine: Annotated[
        str, typer.Option(help="inprocess (fast start) or ray (Flower's simulation engine).")
    ] = "inprocess",
    private: Annotated[
        bool,
        typer.Option(
            "--private",
            help="DP-SGD at every hospital (ε 8, δ 1e-5), fine-tuning from pre-training on synthetic phantoms "
            "(which costs no privacy), over 4 rounds.",
        ),
    ] = False,
    overrides: Overrides = None,
    verbose: Verbose = False,
) -> None:
    """Run the built-in demo: 3 drifted hospitals segmenting lesions, with local-only and pooled baselines."""
    # Deferred, as in every command below: fedmed.config, .data, .runs, .workflows load pydantic, torch or Flower,
    # which `fedmed --help` and the other commands must not wait for.
    from fedmed.workflows.demo import demo_config

    setup_logging(verbose, live=True)
    with user_errors():
        config = demo_config(output_dir=output_dir, engine=engine, private=private, overrides=overrides or [])
        _simulate_and_print(config, verbose=verbose)


@app.command()
def simulate(
    config_file: Annotated[Path | None, typer.Argument(help="Run config (TOML).", metavar="CONFIG")] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue this interrupted run directory from its last checkpoint.")
    ] = None,
    overrides: Overrides = None,
    readmit: Annotated[
        list[str] | None,
        typer.Option(help="With --resume: take this quarantined site back into aggregation (repeatable)."),
    ] = None,
    verbose: Verbose = False,
) -> None:
    """Simulate a federation on this machine and write a run directory with a report."""
    from fedmed.config import load_run_config  # deferred: start-up cost (see demo)

    setup_logging(verbose, live=True)
    with user_errors():
        if resume is not None:
            if config_file is not None or overrides:
                raise FedmedError("--resume continues a run with its own config.toml; drop CONFIG and --set")
            _simulate_and_print(None, verbose=verbose, resume=resume, readmit=readmit or [])
        elif readmit:
            raise FedmedError("--readmit takes a quarantined site back into a run: use it with --resume RUN_DIR")
        elif config_file is None:
            raise FedmedError("give a run CONFIG, or --resume RUN_DIR")
        else:
            config = load_run_config(config_file, overrides=overrides or [])
            _simulate_and_print(config, verbose=verbose, source=str(config_file))


@app.command()
def synth(
    config_file: Annotated[
        Path, typer.Argument(help="TOML with a [synth] section (a run config works).", metavar="CONFIG")
    ],
    out_dir: Annotated[Path, typer.Argument(help="Folder to write one sub-folder per site into.")],
    overwrite: Annotated[bool, typer.Option(help="Replace sites generated from a different config.")] = False,
    verbose: Verbose = False,
) -> None:
    """Write a synthetic multi-site federation of NIfTI files with per-site drift."""
    # Deferred: start-up cost (see demo).
    from fedmed.config import load_synth_config
    from fedmed.data import synthesize_federation

    setup_logging(verbose)
    with user_errors():
        entries = synthesize_federation(load_synth_config(config_file), out_dir, overwrite=overwrite)
    for entry in entries:
        typer.echo(f"{entry.name}: {entry.path}")


@app.command()
def pretrain(
    config_file: Annotated[Path, typer.Argument(help="Run config (TOML).", metavar="CONFIG")],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Weights file to write, or a folder for <name>-pretrained.pt (default: output_dir)"),
    ] = None,
    public: Annotated[
        Path | None,
        typer.Option(
            "--public",
            help="Pre-train on this public data set on this machine instead of phantoms: a site folder, an MSD "
            "dataset.json or an .npz (default: pretrain.public). fedmed never downloads it.",
            metavar="DATA",
        ),
    ] = None,
    cases: Annotated[int | None, typer.Option(help="Training phantoms (default: pretrain.cases, 64).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (default: pretrain.epochs, 5).")] = None,
    seed: Annotated[
        int | None, typer.Option(help="Phantoms' and training's seed (default: pretrain.seed, else synth.seed + 1).")
    ] = None,
    overrides: Overrides = None,
    verbose: Verbose = False,
) -> None:
    """Pre-train the run's network on synthetic phantoms of its task, or on a public data set (no DP: neither
    holds a patient of the federation) and write weights that [model] init loads; prints the file and its metric
    on held-out cases."""
    # Deferred: start-up cost (see demo).
    from fedmed.config import load_run_config
    from fedmed.tasks.start_weights import pretrain_to_file

    setup_logging(verbose)
    with user_errors():
        config = load_run_config(config_file, overrides=overrides or [])
        path, digest, result = pretrain_to_file(config, out, cases=cases, epochs=epochs, seed=seed, public=public)
    if result.public is not None:
        data = result.public
        typer.echo(
            f"{result.metric} {result.value:.3f} on {result.val_cases} validation cases (random init "
            f"{result.random_value:.3f}); public data set {data['data_set']}: {result.cases} training cases, "
            f"{result.epochs} epoch(s), seed {result.seed}"
        )
        typer.echo(f"data: {data['data_path']}  (sha256 {data['data_sha256'][:16]}; validation: {data['validation']})")
    else:
        typer.echo(
            f"{result.metric} {result.value:.3f} on {result.val_cases} held-out phantoms (random init "
            f"{result.random_value:.3f}); {result.cases} phantom cases from {len(result.scanners)} scanner(s), "
            f"{result.epochs} epoch(s), seed {result.seed}"
        )
    typer.echo(f'weights: {path}  (sha256 {digest[:16]}; start a run from them with [model] init = "{path}")')


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A run directory.", metavar="RUN")]) -> None:
    """Re-draw a run's HTML report and print its per-site summary (simulated or deployed, finished or not)."""
    # Deferred: start-up cost (see demo).
    from fedmed.config import load_run_config
    from fedmed.runs.outputs import write_outputs
    from fedmed.runs.report import write_report
    from fedmed.runs.run_dir import SUMMARY_FILE
    from fedmed.runs.status import run_contribution_lines
    from fedmed.runs.summary import format_summary
    from fedmed.tasks import get_task
    from fedmed.workflows.results import existing_run

    with user_errors():
        directory = existing_run(run_dir)
        summary = directory.read_json(SUMMARY_FILE)
        if summary is None:
            # A run that stopped early (failed, interrupted) has no summary yet: make one from what it recorded.
            task = get_task(load_run_config(directory.config_file).task)
            summary = write_outputs(
                directory, primary_metric=task.primary_metric, higher_is_better=task.higher_is_better
            )
        else:
            write_report(directory)
    typer.echo(format_summary(summary))
    for line in run_contribution_lines(directory):
        typer.echo(line)
    typer.echo(f"report: {directory.report_html}")


def _simulate_and_print(
    config: RunConfig | None,
    *,
    verbose: bool,
    source: str = "run config",
    resume: Path | None = None,
    readmit: list[str] | None = None,
) -> None:
    # Deferred: start-up cost (see demo).
    from fedmed.runs.status import run_contribution_lines
    from fedmed.workflows.simulate import resume_simulation
    from fedmed.workflows.simulate import simulate as run_simulation

    set_flower_verbosity(verbose)
    result = resume_simulation(resume, readmit=readmit) if config is None else run_simulation(config, source=source)
    typer.echo("")
    typer.echo(result.table())
    for line in run_contribution_lines(result.run_dir):
        typer.echo(line)
    typer.echo(f"\nrun directory: {result.run_dir.path}\nreport: {result.run_dir.report_html}")
    if result.config.sites:
        # Never a training site's folder: a model scored on the cases it learned from looks better than it is.
        site = result.config.sites[0]
        personal = f" --site {site.name}" if result.config.strategy.fedbn else ""
        out = result.run_dir.path / "predictions"
        manifest = site.path if site.path.name.endswith(".json") else site.path / "dataset.json"
        typer.echo(
            f"apply the model to new scans: fedmed predict {result.run_dir.path} {NEW_SCANS}{personal} --out {out}"
        )
        typer.echo(
            f"  {NEW_SCANS}: scans it never trained on, e.g. {site.name}'s held-out validation cases (listed under "
            f'"validation" in {manifest}), never its training cases'
        )


# The closing hint's placeholder for the reader's own scans.
NEW_SCANS = "NEW_SCANS_FOLDER"

if __name__ == "__main__":
    app()

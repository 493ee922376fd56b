"""Regenerate the benchmark tables of the docs site: run each benchmark's command, stamp what it printed.

Every table the docs show (docs/benchmarks/*.md) is a file docs/benchmarks/tables/NAME.md that a page
includes. This script is the one way such a file is written: it runs the benchmark's command from the
repository root, keeps the markdown tables the command printed (or, for a script that prints plain text,
its whole output as a text block) and writes them under a stamp: the commit of HEAD, whether the working
tree had uncommitted changes, the date, the exact command and the machine. A table therefore names the
code and the command that produced it, and the docs' build warns above any table whose run defaults
(fedmed/config/) changed after its commit (docs/hooks/benchmark_stamps.py).

    python experiments/benchmark_tables.py --list                 # the benchmarks, their commands and times
    python experiments/benchmark_tables.py drift-synthetic scale  # rerun these and rewrite their tables
    python experiments/benchmark_tables.py --all                  # every one (hours on a 2-core machine)

A command that fails leaves its table as it was. Standard library only, so it runs before anything else.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TABLES_DIR = REPO_ROOT / "docs" / "benchmarks" / "tables"
SCRIPT = "experiments/benchmark_tables.py"
STAMP_OPEN = "<!-- benchmark-stamp"
STAMP_CLOSE = "-->"
# The fields of a stamp, in the order they are written; docs/hooks/benchmark_stamps.py and
# tests/ci/test_docs.py read them.
STAMP_FIELDS = ("name", "commit", "dirty", "date", "command", "machine", "source", "rerun")


@dataclass(frozen=True)
class Benchmark:
    """One table: the command that prints it (run from the repository root) and about how long it takes."""

    name: str
    argv: tuple[str, ...]
    minutes: str = "?"

    @property
    def command(self) -> str:
        return shlex.join(["python", *self.argv])

    @property
    def output(self) -> Path:
        return TABLES_DIR / f"{self.name}.md"


def _every_site(dataset: str, minutes: str) -> Benchmark:
    argv = ("experiments/personalization/bench_every_site.py", "--dataset", dataset, "--seeds", "0", "1", "2")
    return Benchmark(f"every-site-{dataset}", argv, minutes)


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("drift-synthetic", ("experiments/drift/run_drift.py", "--dataset", "synthetic"), "1.5"),
    Benchmark("drift-ixi", ("experiments/drift/run_drift.py", "--dataset", "ixi"), "1"),
    _every_site("synthetic", "5"),
    _every_site("ixi", "2.4"),
    _every_site("ixi-brats", "8"),
    _every_site("brats", "38"),
    _every_site("hippocampus", "42"),
    Benchmark("overhead", ("experiments/bench_overhead.py", "--repeats", "7", "--ray")),
    Benchmark("scale", ("experiments/bench_scale.py",)),
    Benchmark("deployment", ("experiments/bench_deployment.py", "--rounds", "5")),
    Benchmark(
        "dp-sgd-cost",
        (
            "experiments/bench_dp_sgd.py",
            "--steps",
            "20",
            "--batch",
            "4",
            "32",
            "--trainable",
            "all",
            "adapters",
            "head",
            "norm",
        ),
        "15",
    ),
    Benchmark("secagg-cost", ("experiments/bench_secagg.py", "--rounds", "4")),
    Benchmark(
        "dp-utility",
        ("experiments/bench_dp_utility.py", "--data", "synthetic64", "pneumoniamnist", "hippocampus", "clientdp50"),
    ),
    Benchmark(
        "dp-public-pneumoniamnist",
        (
            "experiments/bench_dp_utility.py",
            *("--data", "pneumoniamnist", "--public", "--epsilons", "8", "3", "1"),
            *("--dp", "max_epochs_per_round=2", "--compare-trainable", "all", "head"),
        ),
        "40",
    ),
    Benchmark(
        "dp-public-hippocampus",
        (
            "experiments/bench_dp_utility.py",
            *("--data", "hippocampus", "--public", "--epsilons", "8", "1"),
            *("--dp", "max_epochs_per_round=2", "--public-epochs", "20"),
        ),
        "40",
    ),
    Benchmark("scan-memory", ("experiments/bench_scan_memory.py",), "42"),
    Benchmark("sliding-window", ("experiments/bench_sliding_window.py",), "6.5"),
    Benchmark("pretrained-start", ("experiments/bench_pretrained_init.py",), "5"),
    Benchmark("trust", ("experiments/bench_trust.py",), "8"),
    Benchmark("calibration", ("experiments/bench_calibration.py",), "2"),
    Benchmark("robustness", ("experiments/bench_robustness.py", "--out", "runs/bench-robustness"), "75"),
    Benchmark(
        "compression",
        ("experiments/bench_compression.py", "--datasets", "pneumonia", "ixi", "--out", "runs/bench-compression"),
        "25",
    ),
    Benchmark(
        "compression-hippocampus",
        (
            "experiments/bench_compression.py",
            *("--datasets", "hippocampus", "--out", "runs/bench-compression"),
        ),
        "60",
    ),
    Benchmark(
        "compression-long-run",
        (
            "experiments/bench_compression.py",
            *("--datasets", "ixi", "--rounds", "40", "--arms", "top-1%+8-bit", "--seeds", "0"),
            *("--out", "runs/bench-compression"),
        ),
        "5",
    ),
    Benchmark("coordinator-memory", ("experiments/bench_coordinator_memory.py",), "25"),
    Benchmark("large-model-deployed", ("experiments/bench_large_model_deployed.py",), "15"),
    Benchmark(
        "robustness-pneumonia",
        (
            "experiments/bench_robustness.py",
            "--datasets",
            "pneumonia",
            "--seeds",
            "0",
            "1",
            "2",
            "--out",
            "runs/bench-robustness",
        ),
        "75",
    ),
    Benchmark(
        "robustness-7",
        (
            "experiments/bench_robustness.py",
            *("--datasets", "synthetic", "--sites", "7", "--bad-sites", "2", "--seeds", "0"),
            *("--attacks", "clean", "labels_flipped", "update_negated"),
            *("--defences", "default", "median", "multi_krum", "fedavgm"),
            *("--out", "runs/bench-robustness"),
        ),
        "30",
    ),
)


def by_name(names: list[str]) -> list[Benchmark]:
    known = {benchmark.name: benchmark for benchmark in BENCHMARKS}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SystemExit(f"{SCRIPT}: unknown benchmark(s) {', '.join(unknown)}; `--list` shows {', '.join(known)}")
    return [known[name] for name in names]


def rerun_command(name: str) -> str:
    return f"python {SCRIPT} {name}"


def render_stamp(stamp: dict[str, str]) -> str:
    """The stamp as the table file carries it: a comment the hook and tests read, then the same facts folded."""
    missing = [field for field in STAMP_FIELDS if not stamp.get(field)]
    if missing:
        raise ValueError(f"a benchmark stamp needs every field; missing: {', '.join(missing)}")
    comment = "\n".join([STAMP_OPEN, *(f"{field}: {stamp[field]}" for field in STAMP_FIELDS), STAMP_CLOSE])
    rerun = stamp["rerun"]
    rerun = f"`{rerun}`" if rerun.startswith("python ") else rerun
    folded = [
        f'??? info "Made at commit `{stamp["commit"]}` by `{stamp["command"]}`"',
        f"    - date: {stamp['date']}; uncommitted changes: {stamp['dirty']}",
        f"    - machine: {stamp['machine']}",
        f"    - {stamp['source']}",
        f"    - rerun: {rerun}",
    ]
    return comment + "\n\n" + "\n".join(folded) + "\n"


def read_stamp(text: str) -> dict[str, str]:
    """The stamp fields of a table file's text ({} when it has none)."""
    match = re.search(re.escape(STAMP_OPEN) + r"\n(.*?)\n" + re.escape(STAMP_CLOSE), text, re.DOTALL)
    if match is None:
        return {}
    fields = (line.split(":", 1) for line in match.group(1).splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in fields}


def render_table_file(stamp: dict[str, str], body: str) -> str:
    return f"{render_stamp(stamp)}\n{body.strip()}\n"


def _git(*args: str) -> str:
    completed = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return completed.stdout.strip()


def _machine() -> str:
    gpus = "no GPU"
    if shutil.which("nvidia-smi"):
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip()
        gpus = "; ".join(line.split(" (UUID")[0] for line in listed.splitlines()) or gpus
    system = f"{platform.system()} {platform.machine()}, Python {platform.python_version()}"
    return f"{os.cpu_count()} CPU cores, {gpus}, {system}"


def current_stamp(benchmark: Benchmark) -> dict[str, str]:
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return {
        "name": benchmark.name,
        "commit": _git("rev-parse", "--short", "HEAD"),
        "dirty": "yes" if dirty else "no",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": benchmark.command,
        "machine": _machine(),
        "source": f"regenerated by {SCRIPT}",
        "rerun": rerun_command(benchmark.name),
    }


def tables_in(output: str) -> str:
    """The markdown tables a command printed, each with the line just above it (its caption, if any); a command
    that printed none is kept whole as a text block, as it printed it."""
    lines = output.splitlines()
    blocks: list[list[str]] = []
    for index, line in enumerate(lines):
        if not line.startswith("|"):
            continue
        if index > 0 and lines[index - 1].startswith("|"):
            blocks[-1].append(line)
            continue
        caption = lines[index - 1].strip() if index > 0 else ""
        blocks.append([caption, ""] if caption else [])
        blocks[-1].append(line)
    if not blocks:
        return f"```text\n{output.strip()}\n```"
    return "\n\n".join("\n".join(block) for block in blocks)


def run(benchmark: Benchmark) -> bool:
    """Run one benchmark (its output goes to the terminal as it comes) and rewrite its table; False if it failed."""
    print(f"==> {benchmark.name}: {benchmark.command}", flush=True)
    stamp = current_stamp(benchmark)  # before the run: the code that ran, not what changed while it ran
    argv = [sys.executable, *benchmark.argv]
    with subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None
        printed = []
        for line in process.stdout:
            print(line, end="", flush=True)
            printed.append(line)
    if process.returncode != 0:
        print(f"==> {benchmark.name} failed (exit code {process.returncode}); {benchmark.output} left as it was")
        return False
    benchmark.output.parent.mkdir(parents=True, exist_ok=True)
    benchmark.output.write_text(render_table_file(stamp, tables_in("".join(printed))))
    print(f"==> {benchmark.name}: wrote {benchmark.output}")
    return True


def list_benchmarks() -> None:
    for benchmark in BENCHMARKS:
        stamp = read_stamp(benchmark.output.read_text()) if benchmark.output.exists() else {}
        made = f"commit {stamp['commit']}, {stamp['date']}" if stamp else "no table yet"
        print(f"{benchmark.name:<24}{benchmark.minutes:>5} min  {benchmark.command}")
        print(f"{'':<35}-> {benchmark.output.relative_to(REPO_ROOT)} ({made})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to rerun (see --list)")
    parser.add_argument("--list", action="store_true", help="print every benchmark, its command and its table")
    parser.add_argument("--all", action="store_true", help="rerun every benchmark")
    args = parser.parse_args(argv)
    if args.list:
        list_benchmarks()
        return 0
    if not args.names and not args.all:
        parser.error("name the benchmarks to rerun (see --list), or --all")
    chosen = list(BENCHMARKS) if args.all else by_name(args.names)
    failed = [benchmark.name for benchmark in chosen if not run(benchmark)]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The `packinfer-bench` command line.

Starting it is cheap (`--help`, `traces list`, each TAB of shell completion): torch, pandas, matplotlib and the
measuring code are imported inside the commands that use them, and nothing changes the environment on import.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from packinfer_bench.errors import PackinferBenchError
from packinfer_bench.resources import data_dir
from packinfer_bench.traces import KINDS, SHIPPED, shipped_dir

if TYPE_CHECKING:
    import pandas as pd
    from rich.table import Table

EXPERIMENTS_DIR = data_dir("experiments")
#: `run`'s exit status when --time-limit stopped it with work left (0: all done; 1: an error).
TIME_LIMIT_EXIT = 3


def prepare_kernels() -> bool:
    """Before triton is first imported by a command that runs kernels: without a GPU, run them under the Triton
    interpreter (TRITON_INTERPRET=1 unless set). Returns whether a GPU is present."""
    import torch

    gpu = torch.cuda.is_available()
    if not gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return gpu


def default_config() -> Path:
    """The experiment `run` picks when none is named: the smoke test without a GPU, else the GPU's sweep."""
    import torch

    if not torch.cuda.is_available():
        return EXPERIMENTS_DIR / "smoke.yaml"
    name = torch.cuda.get_device_name(0)
    return EXPERIMENTS_DIR / ("a100.yaml" if "A100" in name else "h100.yaml")


def split(text: str) -> tuple[str, ...]:
    """The items of a comma-separated option value."""
    return tuple(f.strip() for f in text.split(",") if f.strip())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="packinfer-bench")
@click.option("-v", "--verbose", is_flag=True, help="Show debug messages and full tracebacks on the console (run.log "
              "always has the tracebacks).")
def main(verbose: bool) -> None:
    """Trace-driven benchmarks of PackInfer attention kernels against FlashAttention-style baselines."""
    if click.get_current_context().invoked_subcommand in ("run", "report"):  # the commands that log
        from packinfer_bench.logs import setup_console

        setup_console(verbose)


@main.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Run folder (default: "
              "<output.dir>/<experiment>/<timestamp>).")
@click.option("--dry-run", is_flag=True, help="Load traces and replay the workload only; write batch statistics "
              "and show what the end-to-end replays will take (schedules, modelled minutes, KV cache memory).")
@click.option("--resume", is_flag=True, help="Continue a run folder (--out, or the experiment's latest run), "
              "skipping what it already holds.")
@click.option("--cuda-graphs", is_flag=True, help="Time CUDA-graph replays of each call (sets timing.cuda_graphs; "
              "records say timing: cuda-graph).")
@click.option("--only", type=click.Choice(["kernel", "e2e"]), help="Run one stage: the kernel batches or the "
              "end-to-end replays (default: both).")
@click.option("--backends", "backends", metavar="A,B", help="Run only these of the config's backends "
              "(comma-separated; kernel sweep and end-to-end entries).")
@click.option("--skip", "skip", metavar="A,B", default="", help="Leave out these of the config's backends "
              "(comma-separated).")
@click.option("--set", "overrides", metavar="KEY=VALUE", multiple=True, help="Override a config key before it is "
              "checked: a dotted key, a YAML value, e.g. --set timing.repeats=5 --set 'e2e[0].rates=[2, 4]' "
              "(repeatable; recorded in the run folder's config.yaml).")
@click.option("--gpus", type=click.IntRange(1, 1024), default=1, show_default=True, help="Spread the kernel sweep "
              "over N processes, one per GPU (torch.distributed; on a CPU, N processes), merged into one run folder. "
              "End-to-end entries with `tp: N` start their N ranks themselves.")
@click.option("--time-limit", "time_limit", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Start no batch or replay that would not end within SECONDS of the command's start (by the "
              "slowest seen so far; replays by their modelled time), then stop with exit status "
              f"{TIME_LIMIT_EXIT}: a run cut into time-limited pieces is never killed mid-way. Continue with "
              "--resume. Applies to single-process work (not --gpus > 1, nor tp ranks once started).")
@click.option("--list-backends", is_flag=True, help="List every registered backend, its variants and whether it "
              "can run here (and why not), then exit.")
def run(config: Path | None, out: Path | None, dry_run: bool, resume: bool, cuda_graphs: bool, only: str | None,
        backends: str | None, skip: str, overrides: tuple[str, ...], gpus: int, time_limit: float | None,
        list_backends: bool) -> None:
    """Run an experiment CONFIG (default: experiments/smoke.yaml without a GPU, else the GPU's sweep)."""
    from packinfer_bench.deadline import Deadline

    deadline = Deadline(time_limit)
    prepare_kernels()
    if list_backends:
        import torch

        from packinfer_bench.config import REFERENCE

        _echo_table(f"Backends (on {'cuda' if torch.cuda.is_available() else 'cpu'})", backends_table())
        click.echo(f"End-to-end replays also take {REFERENCE!r}, the float32 reference attention.")
        return
    from packinfer_bench.config import load_config, select_backends
    from packinfer_bench.experiment import run_experiment
    from packinfer_bench.logs import get_logger
    from packinfer_bench.report.result import write_result

    config = config or default_config()
    try:
        cfg = load_config(config, [*overrides, *(["timing.cuda_graphs=true"] if cuda_graphs else [])])
        if backends is not None or skip:
            cfg = select_backends(cfg, split(backends) if backends is not None else None, split(skip))
        get_logger("packinfer_bench.cli").info(f"experiment {cfg.name} ({config})")
        summary = run_experiment(cfg, out, dry_run=dry_run, resume=resume, only=only, gpus=gpus, deadline=deadline)
        if summary.measured:
            get_logger("packinfer_bench.cli").info(f"result: {write_result(summary.out_dir, time.time())}")
    except PackinferBenchError as e:
        raise click.ClickException(str(e)) from None
    if summary.measured:
        _echo_results(summary.out_dir)
    click.echo(f"run folder: {summary.out_dir}")
    if summary.stopped:
        click.echo(f"stopped at the time limit, before {summary.stopped}; continue: packinfer-bench run {config} "
                   f"--resume --out {summary.out_dir}")
        raise SystemExit(TIME_LIMIT_EXIT)
    if summary.measured:
        click.echo(f"next: packinfer-bench report {summary.out_dir}")


def backends_table() -> Table:
    """Every registered backend: its kernel and serving variants, and whether it runs on this machine."""
    import torch
    from rich.table import Table

    from packinfer_bench.backends import BACKENDS

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    table = Table("backend", "kernel variants", "serving variants", "available here")
    for name, backend in BACKENDS.items():
        reason = backend.available(device)
        serving = ", ".join(backend.serving_variants) if backend.serving is not None else "-"
        table.add_row(name, ", ".join(backend.variants), serving, f"no: {reason}" if reason else "yes")
    return table


def _echo_results(run_dir: Path) -> None:
    """A run's headline tables (the report's own), and the CPU note where the timings are the interpreter's."""
    from packinfer_bench.report.summary import CPU_NOTE, headline_tables, is_cpu_run

    for title, table in headline_tables(run_dir).items():
        _echo_table(title, frame_table(table))
    if is_cpu_run(run_dir):
        _echo_note(CPU_NOTE)


def frame_table(df: pd.DataFrame) -> Table:
    """A DataFrame as a rich table: numbers right-aligned to 3 significant digits, missing values blank."""
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD)
    for column in df.columns:
        table.add_column(str(column), justify="right" if df[column].dtype.kind in "iuf" else "left")
    for row in df.itertuples(index=False):
        table.add_row(*(_cell(v) for v in row))
    return table


def _cell(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"  # no exponent above 1000
    return "" if value is None else str(value)


def _stdout():
    from rich.console import Console

    console = Console(highlight=False)
    return console if console.is_terminal else Console(highlight=False, width=200)


def _echo_table(title: str, table: Table) -> None:
    console = _stdout()
    console.print(title, style="bold", markup=False)
    console.print(table)


def _echo_note(text: str) -> None:
    _stdout().print(f"[bold yellow]Note:[/] {text}", soft_wrap=True)


@main.group()
def traces() -> None:
    """Inspect shipped and user trace files."""


@traces.command("list")
def traces_list() -> None:
    """List the shipped traces and the trace kinds (formats) the loaders know."""
    click.echo(f"shipped traces ({shipped_dir()}):")
    for name, (file, kind) in SHIPPED.items():
        click.echo(f"  {name:<16} {kind:<10} {file}")
    click.echo("trace kinds:")
    for kind in KINDS.values():
        click.echo(f"  {kind.name:<10} {kind.description}")


@traces.command("describe")
@click.argument("source")
@click.option("--kind", type=click.Choice(sorted(KINDS)), help="Trace kind (default: detected from the file).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def traces_describe(source: str, kind: str | None, as_json: bool) -> None:
    """Rows, time span, length percentiles and prefix sharing of a shipped trace NAME or a file PATH."""
    from packinfer_bench.traces import load_trace

    try:
        trace = load_trace(source, kind)
    except PackinferBenchError as e:
        raise click.ClickException(str(e)) from None
    info = trace.describe()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    from packinfer_bench.traces import describe_lines

    click.echo("\n".join(describe_lines(info)))


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Report folder (default: RUN_DIR/report).")
@click.option("--format", "formats", default="md,csv", show_default=True,
              help="Table formats, comma-separated: md, csv, tex.")
@click.option("--figures", default="png", show_default=True,
              help="Figure formats, comma-separated: png, pdf ('' for none).")
@click.option("--compare", "compare", multiple=True, type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Another run folder whose speed-ups go side by side with RUN_DIR's (repeatable).")
def report(run_dir: Path, out: Path | None, formats: str, figures: str, compare: tuple[Path, ...]) -> None:
    """Tables (speed-ups, ablation, plan cost, correctness; comparison with other runs), figures and summary.md
    from a run folder's records; result.json refreshed with the metrics now (a run stopped before its end
    wrote none)."""
    from packinfer_bench.report import write_report
    from packinfer_bench.report.result import write_result
    from packinfer_bench.run_folder.files import SESSIONS_FILE

    labels = {}
    for path in compare:
        label = path.name if path.name not in labels and path.name != run_dir.name else str(path)
        labels[label] = path
    try:
        summary = write_report(run_dir, out, split(formats), split(figures), labels)
        if (run_dir / SESSIONS_FILE).is_file():
            write_result(run_dir)
    except PackinferBenchError as e:
        raise click.ClickException(str(e)) from None
    _echo_results(run_dir)
    click.echo(f"report: {summary}")


@main.command()
def env() -> None:
    """Print the environment that env.json records (GPU, driver, CUDA, versions, git commit)."""
    from packinfer_bench import envinfo

    click.echo(json.dumps(envinfo.collect(), indent=2))


if __name__ == "__main__":
    main()

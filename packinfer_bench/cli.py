"""The `packinfer-bench` command line."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import click
import torch

if not torch.cuda.is_available():  # Triton kernels run under the interpreter; must be set before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

from packinfer_bench import envinfo
from packinfer_bench.config import load_config
from packinfer_bench.errors import PackinferBenchError
from packinfer_bench.experiment import run_experiment
from packinfer_bench.report import write_report
from packinfer_bench.report.result import write_result
from packinfer_bench.traces import KINDS, SHIPPED, load_trace, shipped_dir

EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "experiments"


def default_config() -> Path:
    """The experiment `run` picks when none is named: the smoke test without a GPU, else the GPU's sweep."""
    if not torch.cuda.is_available():
        return EXPERIMENTS_DIR / "smoke.yaml"
    name = torch.cuda.get_device_name(0)
    return EXPERIMENTS_DIR / ("a100.yaml" if "A100" in name else "h100.yaml")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="packinfer-bench")
def main() -> None:
    """Trace-driven benchmarks of PackInfer attention kernels against FlashAttention-style baselines."""


@main.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Run folder (default: "
              "<output.dir>/<experiment>/<timestamp>).")
@click.option("--dry-run", is_flag=True, help="Load traces and replay the workload only; write batch statistics.")
@click.option("--resume", is_flag=True, help="Continue a run folder (--out, or the experiment's latest run), "
              "skipping what it already holds.")
@click.option("--cuda-graphs", is_flag=True, help="Time CUDA-graph replays of each call (sets timing.cuda_graphs; "
              "records say timing: cuda-graph).")
@click.option("--only", type=click.Choice(["kernel", "e2e"]), help="Run one stage: the kernel batches or the "
              "end-to-end replays (default: both).")
def run(config: Path | None, out: Path | None, dry_run: bool, resume: bool, cuda_graphs: bool,
        only: str | None) -> None:
    """Run an experiment CONFIG (default: experiments/smoke.yaml without a GPU, else the GPU's sweep)."""
    config = config or default_config()
    try:
        cfg = load_config(config)
        if cuda_graphs:
            cfg.timing.cuda_graphs = True
        click.echo(f"experiment {cfg.name} ({config})")
        summary = run_experiment(cfg, out, dry_run=dry_run, resume=resume, only=only, log=click.echo)
        if summary.measured:
            click.echo(f"result: {write_result(summary.out_dir, time.time())}")
    except PackinferBenchError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"run folder: {summary.out_dir}")


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
    try:
        trace = load_trace(source, kind)
    except PackinferBenchError as e:
        raise click.ClickException(str(e)) from None
    info = trace.describe()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    width = max(len(k) for k in info)
    for key, value in info.items():
        shown = f"{value:.4g}" if isinstance(value, float) else value
        click.echo(f"{key:<{width}}  {shown}")


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
    from a run folder's records."""

    def split(text: str) -> tuple[str, ...]:
        return tuple(f.strip() for f in text.split(",") if f.strip())

    labels = {}
    for path in compare:
        label = path.name if path.name not in labels and path.name != run_dir.name else str(path)
        labels[label] = path
    try:
        summary = write_report(run_dir, out, split(formats), split(figures), labels)
    except PackinferBenchError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"report: {summary}")


@main.command()
def env() -> None:
    """Print the environment that env.json records (GPU, driver, CUDA, versions, git commit)."""
    click.echo(json.dumps(envinfo.collect(), indent=2))


if __name__ == "__main__":
    main()

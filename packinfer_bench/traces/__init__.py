"""Trace loading: a registry of trace kinds (file formats and generators) and the traces shipped in traces/.

To add a format: write a module with `sniff(path) -> bool` and `load(path, *, name, **options) -> Trace`, and
add one `TraceKind` line to `KINDS` below.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from packinfer_bench.errors import TraceError
from packinfer_bench.traces import azure, mooncake, sharegpt, synthetic
from packinfer_bench.traces.base import COLUMNS, Trace, trace_path
from packinfer_bench.traces.tabular import read_text_start

__all__ = ["COLUMNS", "KINDS", "SHIPPED", "Trace", "TraceKind", "check_options", "detect_kind", "load_trace",
           "shipped_dir"]


@dataclass(frozen=True)
class TraceKind:
    name: str
    description: str
    load: Callable[..., Trace]
    sniff: Callable[[Path], bool] | None  # None: not file-based
    #: check_options(options, error): raises error(key, detail) for a bad option value (None: no options)
    check_options: Callable[[dict, Callable[[str, str], Exception]], None] | None = None


KINDS: dict[str, TraceKind] = {k.name: k for k in [
    TraceKind("azure", "Azure LLM inference CSV (TIMESTAMP, ContextTokens, GeneratedTokens)", azure.load, azure.sniff),
    TraceKind("sharegpt", "ShareGPT conversations (JSON, JSONL, hf:OWNER/NAME) or per-turn token counts (CSV)",
              sharegpt.load, sharegpt.sniff, sharegpt.check_options),
    TraceKind("mooncake", "prefix-aware JSONL with hash_ids per 512-token block (Mooncake)", mooncake.load,
              mooncake.sniff, mooncake.check_options),
    TraceKind("synthetic", "seeded lengths: constant, uniform, lognormal, zipf, bimodal; no file",
              synthetic.load, None, synthetic.check_options),
]}

#: Traces shipped in the repository's traces/ folder: name -> (file, kind).
SHIPPED: dict[str, tuple[str, str]] = {
    "azure-conv": ("azure_llm_2023_conv.csv", "azure"),
    "sharegpt": ("sharegpt_8k_llama2_tokens.csv", "sharegpt"),
    "mooncake-conv": ("mooncake_conversation_trace.jsonl", "mooncake"),
}


def shipped_dir() -> Path:
    """The folder of shipped traces ($PACKINFER_TRACES_DIR, else the repository's traces/)."""
    return Path(os.environ.get("PACKINFER_TRACES_DIR", Path(__file__).resolve().parents[2] / "traces"))


def detect_kind(path: Path) -> str:
    """The kind whose format the file's header or fields match; TraceError when none does."""
    text = read_text_start(path)  # TraceError naming the line for binary or non-UTF-8 files
    if not text.strip():
        raise TraceError(f"{path}:1: empty file: no trace to read")
    for kind in KINDS.values():
        if kind.sniff is not None and kind.sniff(path):
            return kind.name
    raise TraceError(f"{path}:1: format not recognised by any trace kind "
                     f"({', '.join(k for k, v in KINDS.items() if v.sniff)}); pass the kind explicitly")


def check_options(kind: str, options: dict, error: Callable[[str, str], Exception]) -> None:
    """Check a loader's options before loading: unknown names and bad values raise error(key, detail)."""
    allowed = [p for p in inspect.signature(KINDS[kind].load).parameters if p not in ("path", "name")]
    unknown = [k for k in options if k not in allowed]
    if unknown:
        raise error(str(unknown[0]), f"unknown option for a {kind} trace; allowed: {allowed}")
    if KINDS[kind].check_options is not None:
        KINDS[kind].check_options(options, error)


def load_trace(source: str | None, kind: str | None = None, *, name: str | None = None, **options) -> Trace:
    """Load a trace by shipped name, file path or `hf:` dataset id; synthetic traces take `source=None`.

    kind: one of KINDS (detected from the file when omitted); options go to the kind's loader.
    """
    if kind is not None and kind not in KINDS:
        raise TraceError(f"unknown trace kind {kind!r}; allowed: {sorted(KINDS)}")
    if kind == "synthetic" or (source is None and kind is None):
        return _call(KINDS["synthetic"].load, None, name=name or "synthetic", **options)
    if source is None:
        raise TraceError(f"trace kind {kind!r} needs a source (shipped name, file path or hf: id)")
    if not isinstance(source, (str, os.PathLike)):
        raise TraceError(f"trace source must be a shipped name, a file path or an hf: id, got {source!r:.80}")
    source = str(source)
    if source in SHIPPED:
        file, shipped_kind = SHIPPED[source]
        path: Path | str = trace_path(shipped_dir() / file)
        kind = kind or shipped_kind
    elif source.startswith(sharegpt.HF_PREFIX):
        path, kind = source, kind or "sharegpt"
    else:
        path = trace_path(source)
        kind = kind or detect_kind(path)
    return _call(KINDS[kind].load, path, name=name or source, **options)


def _call(loader: Callable[..., Trace], path: Path | str | None, **options) -> Trace:
    try:
        inspect.signature(loader).bind(path, **options)
    except TypeError as e:
        allowed = [p for p in inspect.signature(loader).parameters if p not in ("path", "name")]
        raise TraceError(f"trace {options['name']!r}: bad options {sorted(set(options) - {'name'})} ({e}); "
                         f"allowed: {allowed}") from None
    try:
        return loader(path, **options)
    except IsADirectoryError:
        raise TraceError(f"{path}: is a directory, not a trace file") from None
    except OSError as e:  # unreadable (permissions, I/O error)
        raise TraceError(f"{path}: cannot read: {e.strerror or e}") from None

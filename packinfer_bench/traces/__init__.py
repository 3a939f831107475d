"""Trace loading: a registry of trace kinds (file formats and generators) and the traces shipped in traces/.

To add a format: write a module with `sniff(path) -> bool` and `load(path, *, name, **options) -> Trace` (and
optionally `check_options`), and add one `TraceKind` line to `KINDS` below and the module to `_reader`.
Importing this package is cheap (`traces list`, the command line's start): the readers, which need pandas, load
when a trace is first read or checked.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from packinfer_bench.errors import TraceError
from packinfer_bench.resources import data_dir

if TYPE_CHECKING:
    from packinfer_bench.traces.base import COLUMNS, Trace, describe_lines

__all__ = ["COLUMNS", "CREDITS", "KINDS", "SHIPPED", "Trace", "TraceKind", "check_options", "describe_lines",
           "detect_kind", "load_trace", "shipped_dir"]


def _reader(kind: str) -> ModuleType:
    """The module that reads a kind, imported on first use."""
    from packinfer_bench.traces import azure, mooncake, sharegpt, synthetic

    return {"azure": azure, "sharegpt": sharegpt, "mooncake": mooncake, "synthetic": synthetic}[kind]


def __getattr__(name: str) -> object:
    if name in ("COLUMNS", "Trace", "describe_lines"):  # from the trace module, which needs pandas: loaded on use
        from packinfer_bench.traces import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class TraceKind:
    """A trace kind: its name, a one-line description, and (from its reader module) load, sniff (None: not
    file-based) and check_options(options, error), which raises error(key, detail) for a bad option value (None:
    no options)."""

    name: str
    description: str
    file_based: bool = True

    @property
    def load(self) -> Callable[..., Trace]:
        return _reader(self.name).load

    @property
    def sniff(self) -> Callable[[Path], bool] | None:
        return _reader(self.name).sniff if self.file_based else None

    @property
    def check_options(self) -> Callable[[dict, Callable[[str, str], Exception]], None] | None:
        return getattr(_reader(self.name), "check_options", None)


KINDS: dict[str, TraceKind] = {k.name: k for k in [
    TraceKind("azure", "Azure LLM inference CSV (TIMESTAMP, ContextTokens, GeneratedTokens)"),
    TraceKind("sharegpt", "ShareGPT conversations (JSON, JSONL, hf:OWNER/NAME) or per-turn token counts (CSV)"),
    TraceKind("mooncake", "prefix-aware JSONL with hash_ids per 512-token block (Mooncake)"),
    TraceKind("synthetic", "seeded lengths: constant, uniform, lognormal, zipf, bimodal; no file", file_based=False),
]}

#: Traces shipped in the repository's traces/ folder: name -> (file, kind).
SHIPPED: dict[str, tuple[str, str]] = {
    "azure-conv": ("azure_llm_2023_conv.csv", "azure"),
    "sharegpt": ("sharegpt_8k_llama2_tokens.csv", "sharegpt"),
    "mooncake-conv": ("mooncake_conversation_trace.jsonl", "mooncake"),
}

#: Where each shipped trace comes from and its licence, as traces/README.md states them: the only traces
#: credited to a source (a user's file in the same format is not).
CREDITS: dict[str, tuple[str, str]] = {
    "azure-conv": (("Azure/AzurePublicDataset, data/AzureLLMInferenceTrace_conv.csv, commit b469a113; "
                    "Patel et al., Splitwise, ISCA 2024 (Azure Public Dataset)"), "CC-BY-4.0"),
    "sharegpt": (("microsoft/sarathi-serve, data/processed_traces/sharegpt_8k_filtered_stats_llama2_tokenizer.csv, "
                  "commit 72339db5; derived from the ShareGPT conversations"), "Apache-2.0"),
    "mooncake-conv": (("kvcache-ai/Mooncake, FAST25-release/traces/conversation_trace.jsonl, commit 3b5a5941; "
                       "Qin et al., Mooncake, FAST 2025"), "Apache-2.0"),
}


def shipped_dir() -> Path:
    """The folder of shipped traces ($PACKINFER_TRACES_DIR, else the repository's traces/ or its installed copy)."""
    return Path(os.environ.get("PACKINFER_TRACES_DIR", data_dir("traces")))


def detect_kind(path: Path) -> str:
    """The kind whose format the file's header or fields match; TraceError when none does."""
    from packinfer_bench.traces.tabular import read_text_start

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
    from packinfer_bench.traces.base import trace_path

    source = str(source)
    if source in SHIPPED:
        file, shipped_kind = SHIPPED[source]
        path: Path | str = trace_path(shipped_dir() / file)
        kind = kind or shipped_kind
    elif source.startswith(_reader("sharegpt").HF_PREFIX):
        path, kind = source, kind or "sharegpt"
    else:
        path = trace_path(source)
        kind = kind or detect_kind(path)
    trace = _call(KINDS[kind].load, path, name=name or source, **options)
    shipped = source if source in SHIPPED else _shipped_name(path)
    if shipped is not None and kind == SHIPPED[shipped][1]:
        trace.source, trace.licence = CREDITS[shipped]
    return trace


def _shipped_name(path: Path | str) -> str | None:
    """The shipped trace a file path is (the same file, however named), else None."""
    if not isinstance(path, Path):
        return None
    for name, (file, _) in SHIPPED.items():
        try:
            if path.samefile(shipped_dir() / file):
                return name
        except OSError:  # not there (a wheel without traces/, or no such shipped file)
            continue
    return None


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

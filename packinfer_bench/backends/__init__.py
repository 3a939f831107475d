"""Backend registry, the one list the runner, the serving replay and config validation read. To add a baseline:
write packinfer_bench/backends/<name>.py defining a `Backend` (name, variants, available(device), prepare(inputs,
variant) -> timed callable, and optionally serving: a ServingAttention subclass for end-to-end replays) and add it
to BACKENDS below."""

from __future__ import annotations

from packinfer_bench.backends import fa2, fa3, flashinfer, flex, packinfer, sdpa_padded
from packinfer_bench.backends.base import DTYPES, AttentionShape, Backend, Inputs, NotApplicable, ServingAttention, Step

BACKENDS: dict[str, Backend] = {b.name: b for b in [
    fa2.BACKEND,
    fa3.BACKEND,
    sdpa_padded.BACKEND,
    flex.BACKEND,
    flashinfer.BACKEND,
    packinfer.UNPACKED,
    packinfer.BACKEND,
]}

__all__ = ["BACKENDS", "DTYPES", "AttentionShape", "Backend", "Inputs", "NotApplicable", "ServingAttention", "Step"]

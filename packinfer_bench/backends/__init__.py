"""Backend registry. To add a baseline: write packinfer_bench/backends/<name>.py defining a `Backend` (name,
variants, available(device), prepare(inputs, variant) -> timed callable) and add it to BACKENDS below."""

from __future__ import annotations

from packinfer_bench.backends import fa2, flashinfer, flex, packinfer, sdpa_padded
from packinfer_bench.backends.base import AttentionShape, Backend, Inputs, NotApplicable

BACKENDS: dict[str, Backend] = {b.name: b for b in [
    fa2.BACKEND,
    sdpa_padded.BACKEND,
    flex.BACKEND,
    flashinfer.BACKEND,
    packinfer.UNPACKED,
    packinfer.BACKEND,
]}

__all__ = ["BACKENDS", "AttentionShape", "Backend", "Inputs", "NotApplicable"]

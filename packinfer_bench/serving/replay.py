"""One serving replay: a fixed continuous-batching schedule run through the model with one backend's attention,
each iteration a real forward pass, the KV cache kept in step with the schedule by a CacheFollower in the
backend's layout.

Iterations run as a serving engine runs them: the host prepares iteration i+1 (cache bookkeeping, making room,
token ids, the attention plan) while the GPU runs iteration i, and each iteration replays CUDA graphs where it
can: the full forward pass for backends with a graph mode, else the pieces between attention calls, else eagerly.
Times come from CUDA events: an iteration lasts from the end of the previous one to its own end on the GPU
(so a host that falls behind shows as idle GPU time), its GPU time from its first to its last operation, its
host time is what the CPU spent preparing and issuing it. Inside a full graph attention cannot be timed on its own,
so a sample of those iterations is probed (AttentionProbe)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import packinfer
import torch

from packinfer_bench.backends import ServingAttention, Step
from packinfer_bench.backends.base import add_scratch, iteration_kind, scratch_slot
from packinfer_bench.models import ModelConfig
from packinfer_bench.serving.graphs import GraphCaptureError, Graphs
from packinfer_bench.serving.kv_follow import CacheFollower
from packinfer_bench.serving.model import Decoder
from packinfer_bench.workload import Batch

#: Grouped caches reserve this many extra tokens per request to grow into.
HEADROOM = 64
#: Every this many full-graph iterations one is probed for its attention time (AttentionProbe); 0: never.
PROBE_EVERY = 16
#: GPU cycles a second, for the probe's sleep (an overestimate only sleeps longer: H100 and H200 run ~1.98 GHz).
SLEEP_CYCLES_PER_S = 2.0e9


@dataclass
class IterationResult:
    """One iteration: what ran and what it cost (ms). iteration: previous iteration's end to this one's end on
    the GPU (idle time waiting for the host included); gpu: first to last operation of this iteration; host:
    CPU time preparing (cache bookkeeping, making room, token ids, the attention plan) and issuing it;
    attention: GPU time of the attention calls (K/V write + kernels; inside a full graph, where it is not
    observable, NaN except in the iterations AttentionProbe samples); graph: how it ran (full, piecewise, eager)."""

    iteration: int
    kind: str
    num_requests: int
    num_prefill: int
    num_decode: int
    q_tokens: int
    kv_tokens: int
    graph: str
    padded_rows: int
    iteration_ms: float
    gpu_ms: float
    host_ms: float
    prepare_ms: float
    launch_ms: float
    attention_ms: float
    attn_host_us_per_layer: float
    launches_per_layer: int
    room_ms: float
    moved_bytes: int


@dataclass
class ReplayResult:
    iterations: list[IterationResult] = field(default_factory=list)
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # iteration -> sampled rows' final hidden (fp32)
    tokens: dict[int, torch.Tensor] = field(default_factory=dict)  # iteration -> greedy tokens of those rows
    full_graph_failure: str = ""  # why the backend's full graphs could not be captured (it ran piecewise)


@dataclass
class ProbeMarks:
    """When an AttentionProbe ran: its span (start to end, taken out of the iteration's times) and its attention
    calls within it, as CUDA events or, on the CPU, clock seconds; host_s: the host time it took."""

    start: Any
    attention_start: Any
    attention_end: Any
    end: Any
    host_s: float

    def ms(self) -> tuple[float, float]:
        """(span, attention) in ms (CUDA events: once they have completed)."""
        if not isinstance(self.start, torch.cuda.Event):
            return 1e3 * (self.end - self.start), 1e3 * (self.attention_end - self.attention_start)
        return self.start.elapsed_time(self.end), self.attention_start.elapsed_time(self.attention_end)


class AttentionProbe:
    """Attention time of full-graph iterations, where the graph hides it: every `every`-th such iteration first
    runs its attention calls of every layer once more, eagerly, on random q / k / v of the graph's shape (the
    graph then writes the iteration's own K/V over the probe's: outputs are unchanged), behind a GPU sleep that
    lasts until the host has queued them all, so their time is the GPU's, not Python's. The probe's span is
    taken out of the iteration's times; its attention time is the iteration's attention_ms. The host then waits
    for the probe to end (every rank's, under tensor parallelism), so the graph's launch meets an idle GPU as
    after any host-bound gap and no lead carries into later iterations (without that wait, FlashInfer's next six
    decode iterations read 0.37 ms shorter each: results/e2e-h100-matrix/NOTES.md)."""

    def __init__(self, model: Decoder, every: int, clock: Callable[[], float]) -> None:
        self.model, self.every, self.clock = model, every, clock
        self.seen = 0
        self.issue_s = 1e-4 * model.cfg.num_layers  # host time of the last probe's launches; the sleep is twice it
        self._inputs: dict[int, tuple[torch.Tensor, ...]] = {}
        self._token = torch.zeros(1, device=model.device)

    def due(self) -> bool:
        """Count one full-graph iteration; whether it is probed."""
        self.seen += 1
        return self.every > 0 and (self.seen - 1) % self.every == 0

    def run(self, attention: ServingAttention, padded: int) -> ProbeMarks:
        """Probe the iteration of `padded` rows begun on `attention`."""
        dev, a, cuda = self.model.device, attention, self.model.device.type == "cuda"
        h0 = self.clock()
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(4)] if cuda else []
        if cuda:
            marks[0].record()
        if padded not in self._inputs:
            g = torch.Generator(device=dev).manual_seed(padded)
            self._inputs[padded] = tuple(torch.randn(padded, heads, a.head_dim, generator=g, device=dev,
                                                     dtype=self.model.dtype)
                                         for heads in (a.num_heads, a.num_kv_heads, a.num_kv_heads))
        q, k, v = self._inputs[padded]
        if cuda:
            torch.cuda._sleep(int(2 * self.issue_s * SLEEP_CYCLES_PER_S))
            marks[1].record()
        issued = self.clock()
        for layer in range(self.model.cfg.num_layers):
            attention(layer, q, k, v)
        done = self.clock()
        if cuda:
            marks[2].record()
        self.model.tp.all_reduce(self._token)  # every rank's probe ends before the graph starts anywhere
        if cuda:
            marks[3].record()
            marks[3].synchronize()
        else:
            marks = [h0, issued, done, self.clock()]
        self.issue_s = done - issued
        return ProbeMarks(*marks, host_s=self.clock() - h0)


def cache_capacity(attention: ServingAttention, budget_tokens: int, max_seqs: int) -> int:
    """Tokens a backend's cache holds for a schedule whose live KV stays within budget_tokens with at most
    max_seqs requests at once (layout_capacity of its layout)."""
    return layout_capacity(attention.layout, attention.page_size, budget_tokens, max_seqs)


def layout_capacity(layout: str, page_size: int, budget_tokens: int, max_seqs: int) -> int:
    """The budget plus the layout's slack (a partly filled last page per request; grouped: room to grow into, a
    quarter of a request's size at most), plus one page for the scratch slot; paged: in whole pages."""
    if layout == "paged":
        return -(-(budget_tokens + page_size * (max_seqs + 2)) // page_size) * page_size
    return budget_tokens + budget_tokens // 4 + 2 * HEADROOM * max_seqs + 1


def kv_bytes(capacity_tokens: int, cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of a K and V cache of capacity_tokens tokens in every layer of the model."""
    return 2 * capacity_tokens * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * torch.finfo(dtype).bits // 8


def make_cache(attention: ServingAttention, model: Decoder, capacity_tokens: int, pools=None):
    """The backend's KV cache for the model, with its scratch slot (for padded graph rows) allocated first
    (pools: the K/V memory to use, shared with other backends' caches; packinfer.make_cache)."""
    cfg = model.cfg
    cache = packinfer.make_cache(attention.layout, capacity_tokens, cfg.num_kv_heads, cfg.head_dim,
                                 dtype=model.dtype, device=model.device, block_size=attention.page_size,
                                 headroom=HEADROOM, num_layers=cfg.num_layers, pools=pools)
    add_scratch(cache)
    return cache


def token_ids(batch: Batch, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, positions) of the batch's new rows: ids hashed from (sequence, position), the sequence being
    the shared prefix for positions inside it, so prefix tokens are the same in every request of a group."""
    pos = batch.query_positions()
    rid = np.repeat(batch.request_ids, batch.q_lens)
    pid, plen = np.repeat(batch.prefix_ids, batch.q_lens), np.repeat(batch.prefix_lens, batch.q_lens)
    key = np.where((pid >= 0) & (pos < plen), -1 - pid, rid)
    return (key * 2654435761 + pos * 40503 + 977) % vocab, pos


def prepare_graphs(graphs: Graphs, schedule: Sequence[Batch], attention: ServingAttention, cache) -> str:
    """Capture every graph the schedule's iterations need, for this backend: its full graphs where it has a
    graph mode (GraphCaptureError: it then runs piecewise; returns why), the pieces otherwise."""
    failure = graphs.failed.get(attention.name, "")
    scratch = scratch_slot(cache)
    needs: dict[tuple, None] = {}  # (padded size, kind, graph key): iterations of one size and kind may differ in key
    for batch in schedule:
        padded = graphs.padded(int(batch.q_lens.sum()))
        if padded is not None:
            kind, key = iteration_kind(batch), None
            if kind in attention.graph_kinds and not failure:
                key = attention.graph_key(Step(batch, cache, None, None, batch.cu_seqlens()[0], padded))
            needs[padded, kind, key] = None
    for padded, kind, key in sorted(needs, key=lambda need: -need[0]):
        if kind in attention.graph_kinds and not failure:
            try:
                graphs.capture_full(attention, padded, key, cache, scratch)
                continue
            except GraphCaptureError as e:
                if graphs.model.tp.size > 1:  # piecewise capture all-reduces where the other ranks do not: stop
                    raise
                failure = graphs.failed[attention.name] = str(e)
        graphs.capture_piecewise(padded)
    return failure


def replay(model: Decoder, schedule: Sequence[Batch], attention: ServingAttention, cache, *,
           graphs: Graphs | None = None, keep_outputs: int = 0,
           on_iteration: Callable[[IterationResult], None] | None = None,
           clock: Callable[[], float] = time.perf_counter, probe_every: int = PROBE_EVERY) -> ReplayResult:
    """Run every iteration of the schedule (through `graphs` where they hold its size); keep the sampled rows'
    hidden states and tokens of the first `keep_outputs` iterations (for comparison with a reference); probe
    every `probe_every`-th full-graph iteration's attention time (AttentionProbe). A KVCacheError (cache full)
    propagates after the iterations done so far went to on_iteration."""
    dev = model.device
    cuda = dev.type == "cuda"
    follower = CacheFollower(cache, schedule, share_prefixes=attention.share_prefixes, synchronize=False)
    result = ReplayResult(full_graph_failure=graphs.failed.get(attention.name, "") if graphs else "")
    staging = attention.staging
    layer_times: list = []
    attn_host = [0.0]
    pending: list[tuple[dict, object, object, list, ProbeMarks | None]] = []
    probe = AttentionProbe(model, probe_every, clock)

    def timed(layer, q, k, v):
        h0 = clock()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = attention(layer, q, k, v)
            end.record()
            layer_times.append((start, end))
        else:
            out = attention(layer, q, k, v)
            layer_times.append(clock() - h0)
        attn_host[0] += clock() - h0
        return out

    def finish() -> None:
        """Resolve the queued iterations' event times (one synchronisation) and hand them on."""
        if cuda:
            torch.cuda.synchronize(dev)
        for row, (start, end), prev, times, probed in pending:
            if cuda:
                row["gpu_ms"] = start.elapsed_time(end)
                row["iteration_ms"] = prev.elapsed_time(end) if prev is not None else row["gpu_ms"]
                row["attention_ms"] = sum(s.elapsed_time(e) for s, e in times) if times else math.nan
            else:
                row["attention_ms"] = 1e3 * sum(times) if times else math.nan
            if probed is not None:  # the probe's span is not the iteration's
                span, attn = probed.ms()
                row["gpu_ms"] -= span
                row["iteration_ms"] -= span
                row["attention_ms"] = attn
            it = IterationResult(**row)
            result.iterations.append(it)
            if on_iteration is not None:
                on_iteration(it)
        pending.clear()

    prev_end = None
    try:
        for i, batch in enumerate(schedule):
            t0 = clock()
            cost = follower.step(i, batch, write=False)
            ids, pos = token_ids(batch, model.cfg.vocab)
            cu_q = batch.cu_seqlens()[0]
            sample = (cu_q[1:] - 1)[batch.sampled]
            kind, n = iteration_kind(batch), len(ids)
            padded = graphs.padded(n) if graphs is not None else None
            mode, key = "eager", None
            if padded is not None:
                if kind in attention.graph_kinds and not result.full_graph_failure:
                    key = attention.graph_key(Step(batch, cache, None, None, cu_q, padded))
                    mode = "full" if graphs.has_full(attention, padded, key) else mode
                if mode == "eager" and graphs.has_piecewise(padded):
                    mode = "piecewise"
            layer_times.clear()
            attn_host[0] = 0.0
            probed = None
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t1 = clock()
            if mode == "full":  # (a re-layout may have moved the scratch slot: asked every iteration)
                rows, slots = graphs.stage_writes(follower.rows, follower.slots, padded, scratch_slot(cache))
                attention.begin(Step(batch, cache, rows, slots, cu_q, padded))
                graphs.stage_inputs(ids, pos, sample, padded)
                if probe.due():
                    probed = probe.run(attention, padded)
                tokens, hidden = graphs.run_full(attention, padded, key)
                tokens, hidden = tokens[:len(sample)], hidden[:len(sample)]
            else:
                all_rows = len(follower.rows) == n and (follower.rows == np.arange(n)).all()
                rows = None if all_rows else staging.to_device(follower.rows)
                attention.begin(Step(batch, cache, rows, staging.to_device(follower.slots), cu_q))
                if mode == "piecewise":
                    graphs.stage_inputs(ids, pos, sample, padded)
                    tokens, hidden = graphs.run_piecewise(padded, n, timed)
                    tokens, hidden = tokens[:len(sample)], hidden[:len(sample)]
                else:
                    tokens, hidden = model.forward(staging.to_device(ids), staging.to_device(pos), timed,
                                                   staging.to_device(sample))
            t2 = clock()
            if cuda:
                end.record()
            if i < keep_outputs:
                result.hidden[i] = hidden.to("cpu", torch.float32, copy=True)
                result.tokens[i] = tokens.to("cpu", copy=True)
            follower.retire(i, batch)
            t3 = clock()
            probe_s = probed.host_s if probed is not None else 0.0
            phases = batch.request_phases
            row = dict(iteration=i, kind=kind, num_requests=len(batch), num_prefill=int((phases != "decode").sum()),
                       num_decode=int((phases == "decode").sum()), q_tokens=n, kv_tokens=int(batch.kv_lens.sum()),
                       graph=mode, padded_rows=padded if mode != "eager" else n, iteration_ms=(t3 - t0) * 1e3,
                       gpu_ms=(t3 - t0) * 1e3, host_ms=(t3 - t0 - probe_s) * 1e3, prepare_ms=(t1 - t0) * 1e3,
                       launch_ms=(t2 - t1 - probe_s) * 1e3, attention_ms=math.nan,
                       attn_host_us_per_layer=1e6 * attn_host[0] / model.cfg.num_layers if mode != "full" else 0.0,
                       launches_per_layer=attention.launches_per_layer, room_ms=cost.room_s * 1e3,
                       moved_bytes=cost.moved_bytes)
            pending.append((row, (start, end) if cuda else (None, None), prev_end, list(layer_times), probed))
            prev_end = end if cuda else None
            if len(pending) >= 256:  # keep the event queue short (one synchronisation per 256 iterations)
                finish()
    finally:
        finish()
    return result

"""One serving replay: a fixed continuous-batching schedule run through the model with one backend's attention,
each iteration a real forward pass (cache bookkeeping and planning included in its time), the KV cache kept in
step with the schedule by a CacheFollower in the backend's layout."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import packinfer
import torch

from packinfer_bench.backends import ServingAttention, Step
from packinfer_bench.serving.graphs import DecodeGraphs
from packinfer_bench.serving.kv_follow import CacheFollower
from packinfer_bench.serving.model import Decoder
from packinfer_bench.workload import Batch

#: Grouped caches reserve this many extra tokens per request to grow into.
HEADROOM = 64


@dataclass
class IterationResult:
    """One iteration: what ran and what it cost (ms): the whole iteration (bookkeeping, planning, forward,
    synchronised), attention inside it (GPU time from the first to the last event around each layer's cache
    write plus attention call, summed over layers), making room in the cache (inside prepare)."""

    iteration: int
    num_requests: int
    num_prefill: int
    num_decode: int
    q_tokens: int
    kv_tokens: int
    iteration_ms: float
    attention_ms: float
    room_ms: float
    moved_bytes: int
    prepare_ms: float  # CPU: cache bookkeeping, making room, token ids, the attention plan
    launch_ms: float  # CPU: issuing the forward pass (near iteration_ms - prepare_ms: the host is the bottleneck)


@dataclass
class ReplayResult:
    iterations: list[IterationResult] = field(default_factory=list)
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # iteration -> sampled rows' final hidden (fp32)
    tokens: dict[int, torch.Tensor] = field(default_factory=dict)  # iteration -> greedy tokens of those rows


def cache_capacity(attention: ServingAttention, budget_tokens: int, max_seqs: int) -> int:
    """Tokens a backend's cache holds for a schedule whose live KV stays within budget_tokens with at most
    max_seqs requests at once: the budget plus the layout's slack (a partly filled last page per request; grouped
    room to grow into, a quarter of a request's size at most)."""
    if attention.layout == "paged":
        return budget_tokens + attention.page_size * (max_seqs + 1)
    return budget_tokens + budget_tokens // 4 + 2 * HEADROOM * max_seqs


def make_cache(attention: ServingAttention, model: Decoder, capacity_tokens: int):
    cfg = model.cfg
    return packinfer.make_cache(attention.layout, capacity_tokens, cfg.num_kv_heads, cfg.head_dim, dtype=model.dtype,
                                device=model.device, block_size=attention.page_size, headroom=HEADROOM,
                                num_layers=cfg.num_layers)


def token_ids(batch: Batch, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, positions) of the batch's new rows: ids hashed from (sequence, position), the sequence being
    the shared prefix for positions inside it, so prefix tokens are the same in every request of a group."""
    pos = batch.query_positions()
    rid = np.repeat(batch.request_ids, batch.q_lens)
    pid, plen = np.repeat(batch.prefix_ids, batch.q_lens), np.repeat(batch.prefix_lens, batch.q_lens)
    key = np.where((pid >= 0) & (pos < plen), -1 - pid, rid)
    return (key * 2654435761 + pos * 40503 + 977) % vocab, pos


def replay(model: Decoder, schedule: Sequence[Batch], attention: ServingAttention, cache, *,
           graphs: DecodeGraphs | None = None, keep_outputs: int = 0,
           on_iteration: Callable[[IterationResult], None] | None = None,
           clock: Callable[[], float] = time.perf_counter) -> ReplayResult:
    """Run every iteration of the schedule (decode iterations through `graphs` where it has their size); keep the
    sampled rows' hidden states and tokens of the first `keep_outputs` iterations (for comparison with a
    reference). A KVCacheError (cache full) propagates after the iterations done so far went to on_iteration."""
    dev = model.device
    cuda = dev.type == "cuda"
    follower = CacheFollower(cache, schedule, share_prefixes=attention.share_prefixes)
    result = ReplayResult()
    layer_times: list = []

    def timed(layer, q, k, v):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = attention(layer, q, k, v)
            end.record()
            layer_times.append((start, end))
        else:
            t0 = clock()
            out = attention(layer, q, k, v)
            layer_times.append(clock() - t0)
        return out

    for i, batch in enumerate(schedule):
        layer_times.clear()
        t0 = clock()
        cost = follower.step(i, batch, write=False)
        ids, pos = token_ids(batch, model.cfg.vocab)
        cu_q = batch.cu_seqlens()[0]
        all_rows = len(follower.rows) == len(ids) and (follower.rows == np.arange(len(ids))).all()
        rows = None if all_rows else torch.from_numpy(follower.rows).to(dev)
        attention.begin(Step(batch, cache, rows, torch.from_numpy(follower.slots).to(dev), cu_q))
        sample = torch.from_numpy((cu_q[1:] - 1)[batch.sampled]).to(dev)
        t1 = clock()
        graphed = graphs is not None and int(batch.q_lens.max()) == 1 and graphs.covers(len(ids))
        forward = graphs.forward if graphed else model.forward
        tokens, hidden = forward(torch.from_numpy(ids).to(dev), torch.from_numpy(pos).to(dev), timed, sample)
        t2 = clock()
        if cuda:
            torch.cuda.synchronize(dev)
        follower.retire(i, batch)
        took = clock() - t0
        if i < keep_outputs:
            result.hidden[i], result.tokens[i] = hidden.float().cpu(), tokens.cpu()
        attn = sum(s.elapsed_time(e) for s, e in layer_times) if cuda else 1e3 * sum(layer_times)
        phases = batch.request_phases
        it = IterationResult(i, len(batch), int((phases != "decode").sum()), int((phases == "decode").sum()),
                             int(batch.q_lens.sum()), int(batch.kv_lens.sum()), took * 1e3, attn,
                             cost.room_s * 1e3, cost.moved_bytes, (t1 - t0) * 1e3, (t2 - t1) * 1e3)
        result.iterations.append(it)
        if on_iteration is not None:
            on_iteration(it)
    return result

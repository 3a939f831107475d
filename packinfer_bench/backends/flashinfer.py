"""FlashInfer, an optional extra. Variants: fa2 / fa3 = batch prefill over ragged K/V (any batch); decode =
batch decode over a paged KV cache with tensor cores, shared prefix pages referenced by every member (decode
batches); cascade = two-level cascade attention, the shared prefix level read once per group (decode batches
whose requests all belong to a prefix group, members adjacent). wrapper.plan() is the plan cost; FlashInfer
JIT-compiles each module on first use (excluded: the runner prepares once before timing)."""

from __future__ import annotations

import numpy as np
import torch

from packinfer_bench.backends.base import (
    PAGE_SIZE,
    Backend,
    Inputs,
    NotApplicable,
    ServingAttention,
    needs_cuda,
    scratch_slot,
)
from packinfer_bench.backends.kv_layouts import cache_for, page_table

WORKSPACE_BYTES = 256 << 20
#: Per (FlashInfer call, device, shape): why that call cannot run there (None: it can); _problem.
_PROBLEMS: dict[tuple, str | None] = {}


def _available(device: torch.device) -> str | None:
    return needs_cuda(device, "flashinfer",
                      missing="flashinfer is not installed (pip install packinfer-bench[flashinfer])")


def _workspace(x: Inputs) -> torch.Tensor:
    return torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=x.q.device)


def _paged_kv(x: Inputs):
    cache, view = cache_for(x, "paged")
    shape = (-1, PAGE_SIZE, x.shape.num_kv_heads, x.shape.head_dim)
    return view, (cache.k.view(shape), cache.v.view(shape))


def _prepare(x: Inputs, variant: str):
    import flashinfer

    s = x.shape
    if variant in ("fa2", "fa3"):
        wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(_workspace(x), "NHD", backend=variant)
        wrapper.plan(x.cu_q, x.cu_k, s.num_heads, s.num_kv_heads, s.head_dim, causal=True, q_data_type=x.q.dtype)
        return lambda: wrapper.run(x.q, x.k, x.v)
    if int(x.batch.q_lens.max()) != 1:
        raise NotApplicable(f"FlashInfer {variant} takes one query row per request (decode batches)")
    view, kv = _paged_kv(x)
    if variant == "decode":
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(_workspace(x), "NHD", use_tensor_cores=True)
        wrapper.plan(*page_table(view, device=x.q.device), s.num_heads, s.num_kv_heads, s.head_dim, PAGE_SIZE,
                     q_data_type=x.q.dtype, kv_data_type=x.k.dtype)
        return lambda: wrapper.run(x.q, kv)
    # cascade: level 0 = each group's shared full prefix pages, for all its members' queries; level 1 = the rest
    groups = x.batch.shared_prefixes()
    members = [np.concatenate([[first], others]) for first, others, _ in groups]
    if not groups or sum(len(m) for m in members) != len(x.batch) or any(
            (np.diff(m) != 1).any() for m in members):
        raise NotApplicable("cascade needs every request in a prefix group, each group's requests adjacent")
    shared_pages = np.zeros(len(x.batch), np.int64)
    for m, (_, _, length) in zip(members, groups):
        shared_pages[m] = length // PAGE_SIZE
    if (shared_pages == 0).any():
        raise NotApplicable(f"a shared prefix shorter than one page ({PAGE_SIZE} tokens)")
    firsts = np.array([m[0] for m in members])
    level0_indices = np.concatenate([view.block_table[f, :shared_pages[f]] for f in firsts])
    level0 = (torch.tensor(np.concatenate([[0], np.cumsum(shared_pages[firsts])]), dtype=torch.int32),
              torch.tensor(level0_indices, dtype=torch.int32),
              torch.full((len(firsts),), PAGE_SIZE, dtype=torch.int32))
    level1 = page_table(view, first_page=shared_pages)
    qo = [torch.tensor(np.concatenate([[0], np.cumsum([len(m) for m in members])]), dtype=torch.int32),
          torch.arange(len(x.batch) + 1, dtype=torch.int32)]
    dev = x.q.device
    wrapper = flashinfer.MultiLevelCascadeAttentionWrapper(2, _workspace(x), "NHD")
    wrapper.plan([t.to(dev) for t in qo], [level0[0].to(dev), level1[0].to(dev)],
                 [level0[1].to(dev), level1[1].to(dev)], [level0[2].to(dev), level1[2].to(dev)],
                 s.num_heads, s.num_kv_heads, s.head_dim, PAGE_SIZE, q_data_type=x.q.dtype)
    return lambda: wrapper.run(x.q, kv)


def _problem(what: str, key: tuple, attempt) -> str | None:
    """Why FlashInfer's `what` cannot run (the first error line of `attempt()`), or None: tried once per key
    (device and shape). FlashInfer compiles a module on first use, and an offline bundle may lack its sources
    (the H100 machine's lacked the page module's: "flashinfer_page_binding.cu ... missing"), so a serving
    variant that needs it is skipped there, not an error."""
    key = (what, *key)
    if key not in _PROBLEMS:
        try:
            attempt()
            _PROBLEMS[key] = None
        except Exception as e:  # noqa: BLE001 -- any failure: the variant cannot run here, whatever the cause
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            detail = next((line for line in lines if "error" in line.lower()), lines[0] if lines else "")
            _PROBLEMS[key] = f"FlashInfer's {what} does not run here ({type(e).__name__}: {detail})"
    return _PROBLEMS[key]


def _ints(device: torch.device, *values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)


def _one_page(device: torch.device, num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.ones(1, PAGE_SIZE, num_kv_heads, head_dim, dtype=torch.bfloat16, device=device)
    return k, k.clone()


def _append_problem(fi, device: torch.device, num_kv_heads: int, head_dim: int) -> str | None:
    """Why append_paged_kv_cache cannot run on `device` at this KV shape (_problem), tried on one bf16 token."""
    def attempt() -> None:
        token = torch.ones(1, num_kv_heads, head_dim, dtype=torch.bfloat16, device=device)
        zero = _ints(device, 0)
        fi.append_paged_kv_cache(token, token, zero, zero, _one_page(device, num_kv_heads, head_dim), zero,
                                 _ints(device, 0, 1), _ints(device, 1), kv_layout="NHD")
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return _problem("append_paged_kv_cache", (str(device), num_kv_heads, head_dim), attempt)


def _batch_attention_problem(fi, device: torch.device, num_heads: int, num_kv_heads: int,
                             head_dim: int) -> str | None:
    """Why BatchAttention (FlashInfer's persistent kernel for mixed batches) cannot run on `device` at this
    shape (_problem): a FlashInfer that has it, and its module built; tried on one bf16 query row."""
    def attempt() -> None:
        if not hasattr(fi, "BatchAttention"):
            raise RuntimeError(f"FlashInfer {fi.__version__} has no BatchAttention")
        wrapper = fi.BatchAttention("NHD", device=str(device))
        one = torch.ones(1, dtype=torch.int32)
        wrapper.plan(torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32),
                     _ints(device, 0), one, num_heads, num_kv_heads, head_dim, head_dim, PAGE_SIZE, causal=True,
                     q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
        q = torch.ones(1, num_heads, head_dim, dtype=torch.bfloat16, device=device)
        wrapper.run(q, _one_page(device, num_kv_heads, head_dim))
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return _problem("BatchAttention", (str(device), num_heads, num_kv_heads, head_dim), attempt)


class FlashInferAttention(ServingAttention):
    """Serving: a paged cache of PAGE_SIZE-token pages. Decode iterations: batch decode with tensor cores, inside
    CUDA graphs through FlashInfer's CUDA-graph wrappers (one per padded batch size, fixed buffers; padding
    requests read one token of a scratch page); other iterations: batch prefill over the paged cache, with the fa3
    backend on Hopper (fa2 where fa3 cannot plan this cache), eager between the model's graph pieces. FlashInfer's
    plan runs once per iteration; one float workspace serves every wrapper (one call runs at a time). The new
    tokens' K/V go in by the harness's two index_copy_ launches, as for every peer; serving variant "append" (eager
    iterations) uses FlashInfer's own append_paged_kv_cache instead, one launch for K and V. Serving variant
    "batch-attention": every eager iteration (prefill, mixed, decode outside the graphs) runs BatchAttention,
    FlashInfer's persistent kernel that takes prefill and decode rows in one launch."""

    name = "flashinfer"
    graph_kinds = frozenset({"decode"})

    def __init__(self, *args, **options):
        super().__init__(*args, **options)
        import flashinfer

        self._fi = flashinfer
        self._workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self._workspace, "NHD", use_tensor_cores=True)
        hopper = torch.cuda.get_device_capability(self.device)[0] == 9
        self._prefill_backends = ["fa3", "fa2"] if hopper else ["fa2"]
        if options.get("prefill"):  # a serving variant fixes the prefill backend
            self._prefill_backends = [options["prefill"]]
        self._prefills: dict[str, object] = {}
        self._graph_wrappers: dict[int, object] = {}
        self._max_pages = 1
        self._planned = torch.cuda.Event()  # FlashInfer's plan reuses pinned host memory: one plan in flight
        self._planned.record()
        self._append = bool(options.get("append"))  # variant "append"
        self._use_batch_attention = bool(options.get("batch_attention"))  # variant "batch-attention"
        self._batch_attention = None  # made on first use: it holds ~400 MB of workspace
        self._appending = False  # this iteration writes through append_paged_kv_cache
        self._append_args: tuple = ()
        self.launches_per_layer = 3
        self._set_kernel()

    def variant_skip(self, batch) -> str | None:
        if self._append:
            return _append_problem(self._fi, self.device, self.num_kv_heads, self.head_dim)
        if self._use_batch_attention:
            return _batch_attention_problem(self._fi, self.device, self.num_heads, self.num_kv_heads, self.head_dim)
        return None

    def _set_kernel(self) -> None:
        eager = ("BatchAttention (one persistent launch for prefill and decode rows) outside the graphs"
                 if self._use_batch_attention else
                 f"prefill over the paged cache ({self._prefill_backends[0]} backend)")
        self.kernel = f"FlashInfer {self._fi.__version__}: decode (tensor cores, CUDA-graph wrappers), {eager}"

    def configure(self, *, max_rows, max_seqs, max_kv_len, capacity_tokens):
        self._max_pages = -(-capacity_tokens // self.page_size) + max_rows

    def _table(self, step, padded: int | None):
        """FlashInfer's page table of the step (host indptr / last_page_len, device indices), padded with
        requests of one scratch token when `padded` is given."""
        view = step.cache.view(self._request_order())
        indptr, indices, last = (t.numpy() for t in page_table(view))
        if padded is not None and padded > len(indptr) - 1:
            extra = padded - (len(indptr) - 1)
            scratch = scratch_slot(step.cache) // self.page_size
            indptr = np.concatenate([indptr, indptr[-1] + 1 + np.arange(extra)]).astype(np.int32)
            indices = np.concatenate([indices, np.full(extra, scratch)]).astype(np.int32)
            last = np.concatenate([last, np.full(extra, scratch_slot(step.cache) % self.page_size + 1)])
        host = [torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32)).pin_memory() for a in (indptr, last)]
        return host[0], self.staging.to_device(indices.astype(np.int32)), host[1]

    def _plan_args(self, dtype):
        h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        return (h, hkv, d, self.page_size), {"q_data_type": dtype, "kv_data_type": dtype}

    def begin(self, step):
        super().begin(step)
        self._planned.synchronize()
        dt = step.cache.dtype
        (h, hkv, d, ps), kw = self._plan_args(dt)
        self._appending = self._append and step.padded is None
        self.launches_per_layer = 2 if self._appending else 3
        table = self._table(step, step.padded)
        if self._appending:
            self._plan_append(step, table)
        if step.padded is not None:  # decode inside a graph
            self._wrapper = self._graph_wrappers[step.padded]
            self._wrapper.plan(*table, h, hkv, d, ps, **kw)
        elif self._use_batch_attention:
            self._plan_batch_attention(step, table, dt)
        elif int(step.batch.q_lens.max()) == 1:
            self._wrapper = self._decode
            self._decode.plan(*table, h, hkv, d, ps, **kw)
        else:
            qo = torch.from_numpy(step.cu_q.astype(np.int32)).pin_memory()
            while True:
                backend = self._prefill_backends[0]
                try:
                    wrapper = self._prefill_wrapper(backend)
                    wrapper.plan(qo, *table, h, hkv, d, ps, causal=True, **kw)
                    break
                except Exception:  # noqa: BLE001 -- fa3 cannot plan this cache: FlashInfer's fa2 backend from now on
                    if len(self._prefill_backends) == 1:
                        raise
                    self._prefill_backends.pop(0)
                    self._set_kernel()
            self._wrapper = wrapper
        self._planned.record()

    def _plan_batch_attention(self, step, table, dtype) -> None:
        """BatchAttention's plan of the iteration: query rows by request, and each request's KV length from its
        pages (full pages but the last)."""
        if self._batch_attention is None:
            self._batch_attention = self._fi.BatchAttention("NHD", device=str(self.device))
        indptr, indices, last = table
        kv_lens = (indptr[1:] - indptr[:-1] - 1) * self.page_size + last
        qo = torch.from_numpy(step.cu_q.astype(np.int32))
        self._batch_attention.plan(qo, indptr, indices, kv_lens, self.num_heads, self.num_kv_heads, self.head_dim,
                                   self.head_dim, self.page_size, causal=True, q_data_type=dtype, kv_data_type=dtype)
        self._wrapper = self._batch_attention

    def _plan_append(self, step, table) -> None:
        """append_paged_kv_cache's arguments for this iteration: each new token's request (in the batch's order)
        and position, and the page table (`table`, from _table) on the device."""
        b = step.batch
        indptr, indices, last = table
        to = self.staging.to_device
        self._append_args = (to(np.repeat(np.arange(len(b)), b.q_lens).astype(np.int32)),
                             to(b.query_positions().astype(np.int32)), indices, to(indptr.numpy()), to(last.numpy()))

    def __call__(self, layer, q, k, v):
        if not self._appending:
            return super().__call__(layer, q, k, v)
        s = self.step
        if s.rows is not None:
            k, v = k[s.rows], v[s.rows]
        batch_indices, positions, indices, indptr, last = self._append_args
        self._fi.append_paged_kv_cache(k, v, batch_indices, positions, self._pools(layer), indices, indptr, last,
                                       kv_layout="NHD")
        return self.attend(layer, q)

    def _pools(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.step.cache
        shape = (-1, self.page_size, self.num_kv_heads, self.head_dim)
        return c.k_pools[layer].view(shape), c.v_pools[layer].view(shape)

    def _prefill_wrapper(self, backend: str):
        if backend not in self._prefills:
            self._prefills[backend] = self._fi.BatchPrefillWithPagedKVCacheWrapper(self._workspace, "NHD",
                                                                                    backend=backend)
        return self._prefills[backend]

    def capture_begin(self, padded, key, cache):
        self._appending = False
        self.launches_per_layer = 3
        if padded not in self._graph_wrappers:
            dev = self.device
            self._graph_wrappers[padded] = self._fi.BatchDecodeWithPagedKVCacheWrapper(
                self._workspace, "NHD", use_cuda_graph=True, use_tensor_cores=True,
                paged_kv_indptr_buffer=torch.zeros(padded + 1, dtype=torch.int32, device=dev),
                paged_kv_indices_buffer=torch.zeros(self._max_pages, dtype=torch.int32, device=dev),
                paged_kv_last_page_len_buffer=torch.ones(padded, dtype=torch.int32, device=dev))
        scratch = scratch_slot(cache)
        (h, hkv, d, ps), kw = self._plan_args(cache.dtype)
        indptr = torch.arange(padded + 1, dtype=torch.int32)
        last = torch.full((padded,), scratch % ps + 1, dtype=torch.int32)
        indices = torch.full((padded,), scratch // ps, dtype=torch.int32, device=self.device)
        self._wrapper = self._graph_wrappers[padded]
        self._wrapper.plan(indptr, indices, last, h, hkv, d, ps, **kw)

    def attend(self, layer, q):
        out = self._wrapper.run(q, self._pools(layer))
        return out[0] if isinstance(out, tuple) else out  # BatchAttention returns (out, lse)


BACKEND = Backend("flashinfer", ("fa2", "fa3", "decode", "cascade"), _available, _prepare,
                  serving=FlashInferAttention,
                  serving_variants={"serving": {}, "serving-fa2": {"prefill": "fa2"}, "append": {"append": True},
                                    "batch-attention": {"batch_attention": True}})

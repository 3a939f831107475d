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
#: Per (device, KV heads, head dim): why FlashInfer's append_paged_kv_cache cannot run there (None: it can).
_APPEND_PROBLEMS: dict[tuple[str, int, int], str | None] = {}


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


def _append_problem(fi, device: torch.device, num_kv_heads: int, head_dim: int) -> str | None:
    """Why FlashInfer's append_paged_kv_cache cannot run on `device` at this KV shape, or None: tried once on
    one bf16 token. Its page module is compiled on first use, and an offline FlashInfer bundle may lack the
    sources (the H100 machine's did: "flashinfer_page_binding.cu ... missing"), so serving variant "append" is
    skipped there, not an error."""
    key = (str(device), num_kv_heads, head_dim)
    if key not in _APPEND_PROBLEMS:
        def ints(*values: int) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int32, device=device)

        token = torch.ones(1, num_kv_heads, head_dim, dtype=torch.bfloat16, device=device)
        pages = tuple(torch.zeros(1, PAGE_SIZE, num_kv_heads, head_dim, dtype=torch.bfloat16, device=device)
                      for _ in range(2))
        try:
            fi.append_paged_kv_cache(token, token, ints(0), ints(0), pages, ints(0), ints(0, 1), ints(1),
                                     kv_layout="NHD")
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            _APPEND_PROBLEMS[key] = None
        except Exception as e:  # noqa: BLE001 -- any failure: the variant cannot run here, whatever the cause
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            detail = next((line for line in lines if "error" in line.lower()), lines[0] if lines else "")
            _APPEND_PROBLEMS[key] = (f"FlashInfer's append_paged_kv_cache does not run here "
                                     f"({type(e).__name__}: {detail})")
    return _APPEND_PROBLEMS[key]


class FlashInferAttention(ServingAttention):
    """Serving: a paged cache of PAGE_SIZE-token pages. Decode iterations: batch decode with tensor cores, inside
    CUDA graphs through FlashInfer's CUDA-graph wrappers (one per padded batch size, fixed buffers; padding
    requests read one token of a scratch page); other iterations: batch prefill over the paged cache, with the fa3
    backend on Hopper (fa2 where fa3 cannot plan this cache), eager between the model's graph pieces. FlashInfer's
    plan runs once per iteration; one float workspace serves every wrapper (one call runs at a time). The new
    tokens' K/V go in by the harness's two index_copy_ launches, as for every peer; serving variant "append" (eager
    iterations) uses FlashInfer's own append_paged_kv_cache instead, one launch for K and V."""

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
        self._appending = False  # this iteration writes through append_paged_kv_cache
        self._append_args: tuple = ()
        self.launches_per_layer = 3
        self._set_kernel()

    def variant_skip(self, batch) -> str | None:
        if not self._append:
            return None
        return _append_problem(self._fi, self.device, self.num_kv_heads, self.head_dim)

    def _set_kernel(self) -> None:
        self.kernel = (f"FlashInfer {self._fi.__version__}: decode (tensor cores, CUDA-graph wrappers), prefill over "
                       f"the paged cache ({self._prefill_backends[0]} backend)")

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
        return self._wrapper.run(q, self._pools(layer))


BACKEND = Backend("flashinfer", ("fa2", "fa3", "decode", "cascade"), _available, _prepare,
                  serving=FlashInferAttention, serving_variants={"serving": {}, "serving-fa2": {"prefill": "fa2"},
                                    "append": {"append": True}})

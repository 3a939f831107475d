"""The blocked float32 reference: equal to the plain one on small ragged inputs (GQA, q < kv, rows that see no
key), and memory-bounded on a long prompt (a 16k-token, 32-head prefill stays under 4 GB resident)."""

import subprocess
import sys

import packinfer
import pytest
import torch
from conftest import REPO

from packinfer_bench.reference import blocked_attention


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2), (8, 1)])
def test_blocked_reference_equals_the_plain_one(heads, kv_heads):
    gen = torch.Generator().manual_seed(heads + kv_heads)
    q_lens, kv_lens = [1, 17, 5, 64, 3], [1, 40, 5, 64, 130]
    cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()])
    cu_k = torch.tensor([0, *torch.tensor(kv_lens).cumsum(0).tolist()])
    q = torch.randn(int(cu_q[-1]), heads, 32, generator=gen).to(torch.bfloat16)
    k = torch.randn(int(cu_k[-1]), kv_heads, 32, generator=gen).to(torch.bfloat16)
    v = torch.randn(int(cu_k[-1]), kv_heads, 32, generator=gen).to(torch.bfloat16)
    plain = packinfer.reference_varlen_attention(q, k, v, cu_q, cu_k, causal=True)
    for block_bytes in (1, 4 * heads * 40 * 3, 1 << 30):  # one row a block, a few rows, everything at once
        torch.testing.assert_close(blocked_attention(q, k, v, cu_q, cu_k, block_bytes=block_bytes), plain,
                                   rtol=1e-5, atol=1e-5)


def test_a_request_with_more_rows_than_keys_gives_zeros_for_rows_that_see_none():
    q, k = torch.randn(6, 2, 16), torch.randn(3, 2, 16)
    out = blocked_attention(q, k, k.clone(), [0, 6], [0, 3])
    assert (out[:3] == 0).all() and out[3:].abs().sum() > 0


_LONG = """
import resource, torch
from packinfer_bench.reference import blocked_attention
torch.manual_seed(0)
n = 16384
q = torch.randn(n, 32, 8, dtype=torch.bfloat16)
k, v = torch.randn(n, 8, 8, dtype=torch.bfloat16), torch.randn(n, 8, 8, dtype=torch.bfloat16)
out = blocked_attention(q, k, v, [0, n], [0, n])
assert torch.isfinite(out).all()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_a_16k_token_32_head_prompt_verifies_in_under_4_gb():
    """Run in a child process, which measures its own peak (this process's would include the test runner)."""
    run = subprocess.run([sys.executable, "-c", _LONG], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert run.returncode == 0, run.stderr
    peak_kib = int(run.stdout.split()[-1])
    assert peak_kib < 4 * 2**20, f"peak resident memory {peak_kib / 2**20:.2f} GiB"

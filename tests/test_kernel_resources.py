"""Hopper shared-memory budgets of the packed kernel's head-dim-128 tile shapes, compiled for sm_90 on the CPU
(Triton's compiler and the ptxas it ships; no GPU needed) in a process without the Triton interpreter. Shared
memory decides how many programs share an SM: 48 bytes too many once held the 64-slot tile to one program per SM
(results/prefill-hopper/NOTES.md)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

SHARED_PER_SM = 228 * 1024  # Hopper: per SM, of which each resident program reserves 1 KiB
RESERVED_PER_PROGRAM = 1024
SHARED_PER_PROGRAM = 227 * 1024  # the most one program may take


def _shared_bytes(config) -> int:
    """Peak shared memory of the packed kernel compiled for sm_90 at this tile shape (bf16, H=32, Hkv=8, D=128,
    causal, TMA loads), with the constants and launch options a real launch binds."""
    import triton
    from packinfer import packed_attention as pa
    from packinfer import plan_for
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cu = torch.tensor([0, 300, 700], dtype=torch.int32)
    plan = plan_for(cu, cu, 32, 8, 128, causal=True, config=config)
    q = torch.zeros(700, 32, 128, dtype=torch.bfloat16)
    k = torch.zeros(700, 8, 128, dtype=torch.bfloat16)
    bound = pa._bind(q, k, k, q, plan, 0.1, True, pa.NO_OPTIONS, None, [0, 0])
    constexprs = {**bound.constexprs, "DOT_F32": False}  # (the interpreter's workaround, never compiled)
    kernel = pa._packed_attention_fwd
    leading = {"Q": "*bf16", "K": f"tensordesc<bf16[{plan.block_n}, 128]>",
               "V": f"tensordesc<bf16[{plan.block_n}, 128]>", "Out": "*bf16", "LSE": "*bf16", "Slopes": "*bf16"}
    rest = dict(zip(kernel.arg_names[len(leading):], bound.rest))  # plan arrays (int32), scales, strides

    def kind(value) -> str:
        return "*i32" if isinstance(value, torch.Tensor) else "fp32" if isinstance(value, float) else "i32"

    signature = {name: "constexpr" if name in constexprs else leading[name] if name in leading else kind(rest[name])
                 for name in kernel.arg_names}
    source = ASTSource(kernel, signature, constexprs={(kernel.arg_names.index(n),): v for n, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=bound.options).metadata.shared


TILES = {"short": (300, 300), "long": (4096, 4096)}  # a prompt length that gets each tile


@pytest.fixture(scope="module")
def shared_bytes():
    """{tile: ((slots, stages), shared bytes)}, compiled in a child process (the interpreter cannot compile for a
    GPU)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    done = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0 and "ptxas" in done.stderr:
        pytest.skip(f"this Triton cannot compile for sm_90: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_short_tile_fits_two_programs_per_hopper_sm(shared_bytes):
    (slots, stages), shared = shared_bytes["short"]
    assert (slots, stages) == (64, 3)
    assert 2 * (shared + RESERVED_PER_PROGRAM) <= SHARED_PER_SM, (
        f"the 64-slot tile needs {shared} bytes of shared memory: one program per SM instead of two")


def test_the_long_tile_fits_one_program(shared_bytes):
    (slots, _), shared = shared_bytes["long"]
    assert slots == 128 and shared <= SHARED_PER_PROGRAM


if __name__ == "__main__":  # the child process: print {tile: ((slots, stages), shared bytes)}
    from packinfer import choose_config

    out = {}
    for name, (q, kv) in TILES.items():
        cfg = choose_config(np.array([q]), np.array([kv]), 32, 8, 128)
        out[name] = ((cfg.slots, cfg.num_stages), _shared_bytes(cfg))
    print(json.dumps(out))

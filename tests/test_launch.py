"""Plan-bound kernel launches: the first call and any call whose tensors change alignment go through Triton;
the others launch the compiled kernel directly, with the leading tensors, the bound arguments and the
constexprs in the kernel's parameter order."""

import types

import torch
from packinfer.launch import Bound


class _Compiled:
    function, packed_metadata = "function", "metadata"

    def __init__(self):
        self.direct = []

    def run(self, *args):
        self.direct.append(args)


class _Kernel:
    arg_names = ("Q", "Out", "n", "scale", "BLOCK", "CAUSAL")

    def __init__(self):
        self.compiled, self.through_triton = _Compiled(), []

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.through_triton.append((grid, args, kwargs))
            return self.compiled
        return call


def test_a_bound_launch_goes_direct_after_its_first_call_until_alignment_changes(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: types.SimpleNamespace(cuda_stream=42))
    kernel = _Kernel()
    bound = Bound(kernel, (3, 2), (17, 0.5), {"CAUSAL": True, "BLOCK": 64}, {"num_warps": 4})
    q, out = torch.zeros(64, dtype=torch.float16), torch.zeros(64, dtype=torch.float16)
    bound(q, out)
    assert kernel.through_triton == [((3, 2), (q, out, 17, 0.5), {"CAUSAL": True, "BLOCK": 64, "num_warps": 4})]
    q2 = torch.ones(64, dtype=torch.float16)
    bound(q2, out)
    (args,) = kernel.compiled.direct
    assert args[:9] == (3, 2, 1, 42, "function", "metadata", None, None, None)
    assert args[9] is q2 and args[10] is out and args[11:] == (17, 0.5, 64, True)  # parameter order
    bound(q2[1:], out)  # 2 bytes off 16-byte alignment: Triton specialises on it, so Triton's path again
    assert len(kernel.through_triton) == 2 and len(kernel.compiled.direct) == 1


def test_under_the_interpreter_every_call_goes_through_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernel = _Kernel()
    bound = Bound(kernel, (1,), (1, 1.0), {"BLOCK": 16, "CAUSAL": False}, {})
    for _ in range(3):
        bound(torch.zeros(8), torch.zeros(8))
    assert len(kernel.through_triton) == 3 and not kernel.compiled.direct

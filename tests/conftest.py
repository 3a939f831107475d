"""Shared test helpers. Kernels run under the Triton interpreter on the CPU unless PACKINFER_TEST_GPU=1."""

import os
from pathlib import Path

if os.environ.get("PACKINFER_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture
def write(tmp_path):
    """Write text to a file under tmp_path and return its path."""

    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return _write


@pytest.fixture(scope="session")
def device():
    import torch

    return torch.device("cuda" if os.environ.get("PACKINFER_TEST_GPU") == "1" else "cpu")

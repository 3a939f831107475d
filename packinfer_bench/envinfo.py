"""What the measurement ran on: GPU, driver, CUDA, library versions, git commit (no hostname)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

from packinfer_bench.resources import checkout_root

OPTIONAL_PACKAGES = ("flash-attn", "flashinfer-python", "triton", "numpy", "pandas")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_sha(repo: Path | None = None) -> str | None:
    """The PACKINFER_GIT_SHA environment variable when set (a copy of the tree sent to a GPU machine may carry a
    stale .git), else the commit of the working tree (with '-dirty' when it has uncommitted changes), else None."""
    cwd = repo or checkout_root()
    if os.environ.get("PACKINFER_GIT_SHA"):
        return os.environ["PACKINFER_GIT_SHA"]
    if cwd is None or not (cwd / ".git").exists():  # an installed wheel: no commit to name
        return None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def collect(full: bool = False) -> dict[str, object]:
    """Environment facts for env.json (full: also torch.utils.collect_env's report and the GPU's clocks, as
    each measuring session records them)."""
    import torch

    info: dict[str, object] = {
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "git_sha": git_sha(),
        "packages": {name: _version(name) for name in OPTIONAL_PACKAGES},
    }
    try:
        import flashinfer  # noqa: F401  (may be on PYTHONPATH without package metadata)

        info["packages"]["flashinfer-python"] = getattr(flashinfer, "__version__", "unknown")
    except Exception:
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {
            "name": props.name,
            "sms": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "count": torch.cuda.device_count(),
            "driver": _driver_version(),
        }
    if full:
        info["gpu_clocks"] = gpu_clocks()
        info["collect_env"] = torch_environment()
    return info


def describe(env: dict) -> str:
    """env.json's facts in one line: the GPU (name, SMs, driver as known) or "CPU (Triton interpreter)" when the
    run saw no GPU, then torch, triton and flashinfer where installed, and the commit."""
    gpu = env.get("gpu") or {}
    packages = env.get("packages") or {}
    if gpu:
        facts = [f"{gpu['sms']} SMs" if gpu.get("sms") else "", f"driver {gpu['driver']}" if gpu.get("driver") else ""]
        facts = [f for f in facts if f]
        where = str(gpu.get("name") or "unnamed GPU") + (f" ({', '.join(facts)})" if facts else "")
    else:
        where = "CPU (Triton interpreter)"
    versions = [("torch", env.get("torch")), ("triton", packages.get("triton")),
                ("flashinfer", packages.get("flashinfer-python"))]
    return ", ".join([where, *(f"{name} {v}" for name, v in versions if v),
                      f"commit {env.get('git_sha') or 'unknown'}"])


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def gpu_clocks() -> dict[str, str] | None:
    """The GPU's current and maximum SM / memory clocks, power and temperature as nvidia-smi reports them."""
    fields = ("clocks.sm", "clocks.mem", "clocks.max.sm", "clocks.max.mem", "power.draw", "temperature.gpu")
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    return dict(zip(fields, (v.strip() for v in out.stdout.strip().splitlines()[0].split(","))))


def torch_environment() -> str:
    """torch.utils.collect_env's report (versions of torch, CUDA, cuDNN, drivers, GPUs, libraries)."""
    try:
        from torch.utils import collect_env

        return collect_env.get_pretty_env_info()
    except Exception as e:  # noqa: BLE001 -- it shells out to several tools; a missing one must not stop a run
        return f"torch.utils.collect_env failed: {type(e).__name__}: {e}"

"""A wheel install works away from the checkout: both distributions build, install into a fresh venv, and the
README's first commands run from an unrelated folder with the shipped traces and experiments the wheel carries.

No download: the wheels build without isolation and install with --no-deps; the fresh venv sees this
environment's site-packages (torch, pandas, ...) through a .pth file, after its own, so packinfer and
packinfer_bench are the wheels' copies, never the checkout's."""

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

from packinfer_bench.config import load_config
from packinfer_bench.errors import ConfigError
from packinfer_bench.resources import data_dir, find_experiment

#: What a wheel build reads: the root distribution's files and the kernel library's folder.
SOURCES = ["pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE", "packinfer_bench", "traces",
           "experiments", "kernels"]


def _run(args: list, cwd: Path, env: dict | None = None) -> str:
    done = subprocess.run([str(a) for a in args], check=False, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"{' '.join(map(str, args))} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    """A fresh venv holding the two wheels (built from a clean copy of the sources, so no stale build/ leaks in),
    and an environment for running its commands."""
    tmp = tmp_path_factory.mktemp("install")
    src, wheels, venv = tmp / "src", tmp / "wheels", tmp / "venv"
    src.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
        else:
            shutil.copy2(path, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels,
          src / "kernels", src], cwd=tmp)
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", *sorted(wheels.glob("*.whl"))],
         cwd=tmp)
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).strip())
    outer = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    (purelib / "outer-environment.pth").write_text("\n".join(outer) + "\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PACKINFER_TRACES_DIR", "PACKINFER_GIT_SHA")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return venv, env


@pytest.mark.install
def test_the_wheels_carry_the_data_and_type_markers_and_one_version(installed):
    venv, _ = installed
    wheels = sorted((venv.parent / "wheels").glob("*.whl"))
    bench = zipfile.ZipFile(next(w for w in wheels if w.name.startswith("packinfer_bench-"))).namelist()
    kernels = zipfile.ZipFile(next(w for w in wheels if w.name.startswith("packinfer-"))).namelist()
    assert "packinfer_bench/_data/traces/sharegpt_8k_llama2_tokens.csv" in bench
    assert "packinfer_bench/_data/experiments/smoke.yaml" in bench
    assert "packinfer_bench/py.typed" in bench and "packinfer/py.typed" in kernels
    assert not any(n.startswith("packinfer/") for n in bench), "the kernel library is its own distribution"
    assert {w.name.split("-")[1] for w in wheels} == {_version_in_source()}


@pytest.mark.install
def test_the_kernel_library_needs_only_torch_triton_and_numpy(installed):
    venv, _ = installed
    wheel = next((venv.parent / "wheels").glob("packinfer-*.whl"))
    metadata = zipfile.ZipFile(wheel).read(f"packinfer-{_version_in_source()}.dist-info/METADATA").decode()
    required = {re.match(r"Requires-Dist: *([A-Za-z0-9_.-]+)", line)[1] for line in metadata.splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line}
    assert required == {"torch", "triton", "numpy"}


@pytest.mark.install
def test_installed_commands_run_from_any_folder(installed, tmp_path):
    venv, env = installed
    code = ("import packinfer, packinfer_bench, packinfer_bench.resources as r; "
            "print(packinfer.__file__); print(packinfer_bench.__file__); print(r.data_dir('traces'))")
    where = _run([venv / "bin" / "python", "-c", code], cwd=tmp_path, env=env).split()
    assert all(Path(p).resolve().is_relative_to(venv.resolve()) for p in where), where  # not the checkout's copies

    described = _run(["packinfer-bench", "traces", "describe", "sharegpt", "--json"], cwd=tmp_path, env=env)
    assert json.loads(described)["rows"] == 30731  # the shipped trace, read from the wheel's copy

    _run(["packinfer-bench", "run", "experiments/smoke.yaml", "--dry-run"], cwd=tmp_path, env=env)
    runs = [p for p in (tmp_path / "runs" / "smoke").iterdir() if p.is_dir()]
    assert len(runs) == 1 and (runs[0] / "workload.csv").is_file()  # new runs go to ./runs/, not results/

    version = _run([venv / "bin" / "python", "-m", "packinfer_bench", "--version"], cwd=tmp_path, env=env)
    assert _version_in_source() in version


def test_a_shipped_experiment_is_found_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = data_dir("experiments") / "h100.yaml"
    assert find_experiment(Path("experiments/h100.yaml")) == shipped
    assert find_experiment(Path("h100.yaml")) == find_experiment(Path("h100")) == shipped
    assert load_config("experiments/smoke.yaml").name == "smoke"


def test_a_file_in_the_current_folder_wins_and_a_missing_one_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "h100.yaml").write_text("name: mine\n", encoding="utf-8")
    assert find_experiment(Path("experiments/h100.yaml")) == Path("experiments/h100.yaml")
    assert find_experiment(Path("experiments/nope.yaml")) == Path("experiments/nope.yaml")
    with pytest.raises(ConfigError, match="config file not found: experiments/nope.yaml"):
        load_config("experiments/nope.yaml")


def _version_in_source() -> str:
    """The one version source: the `__version__` line of kernels/packinfer/__init__.py."""
    line = next(ln for ln in (REPO / "kernels" / "packinfer" / "__init__.py").read_text().splitlines()
                if ln.startswith("__version__"))
    return line.split("=", 1)[1].strip().strip("\"'")

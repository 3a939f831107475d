"""benchmarks/cache_kernel_ab.py, the A/B of two versions of the cache kernel, on the CPU (--smoke: the Triton
interpreter, a tiny shape): given this tree's own kernel as the "before" version, every plan it weighs runs, is
checked against the float32 reference, and the two versions give the same error (the same code, the same bits)."""

import csv
import os
import shutil
import subprocess
import sys

from conftest import REPO


def test_the_kernel_against_itself_gives_identical_results_on_every_plan(tmp_path):
    before = tmp_path / "before.py"
    shutil.copy(REPO / "kernels" / "packinfer" / "cache_attention.py", before)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "kernels"), *sys.path])}
    done = subprocess.run([sys.executable, "benchmarks/cache_kernel_ab.py", "--before", str(before), "--smoke",
                           "--out", str(tmp_path / "ab"), "--only", "serving-8/sharegpt/it0"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "ab" / "ab.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["plan"] for r in rows][0] == "planner" and {"s16", "s32"} <= {r["plan"] for r in rows}
    for r in rows:
        assert r["status"] == "ok" and float(r["rel_err_before"]) == float(r["rel_err_after"]) < 1e-2, r
        assert float(r["before_ms"]) > 0 and float(r["after_ms"]) > 0
    assert "0 incorrect" in done.stdout

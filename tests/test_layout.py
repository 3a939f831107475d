"""The kernel library stands alone: importing packinfer never imports the harness."""

import re
import subprocess
import sys

from conftest import REPO


def test_packinfer_does_not_import_the_harness():
    code = "import sys, packinfer; sys.exit(any(m.startswith('packinfer_bench') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    for source in (REPO / "kernels" / "packinfer").rglob("*.py"):
        assert not re.search(r"^\s*(from|import)\s+packinfer_bench", source.read_text(), re.M), source


def test_shipped_traces_are_documented():
    readme = (REPO / "traces" / "README.md").read_text()
    for trace in (REPO / "traces").iterdir():
        if trace.name != "README.md":
            assert trace.name in readme, trace.name

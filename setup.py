"""Build step pyproject.toml cannot declare: copy the repository's traces/ and experiments/ into the package
(packinfer_bench/_data/), so that an installed wheel carries them while the checkout keeps them at the top level
where users see them (packinfer_bench/resources.py finds either)."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
DATA_FOLDERS = ("traces", "experiments")  # as packinfer_bench.resources.DATA_FOLDERS


class BuildPyWithData(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the checkout's folders
        for name in DATA_FOLDERS:
            source = ROOT / name
            if not source.is_dir():
                raise FileNotFoundError(f"{source}: missing; a wheel of packinfer-bench must carry {name}/")
            self.copy_tree(str(source), str(Path(self.build_lib) / "packinfer_bench" / "_data" / name))


setup(cmdclass={"build_py": BuildPyWithData})

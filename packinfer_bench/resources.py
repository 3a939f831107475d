"""Where the shipped data folders (traces/, experiments/) and the source checkout are, however the package is installed.

A wheel carries copies of the repository's traces/ and experiments/ under packinfer_bench/_data/ (setup.py puts
them there at build time); a source checkout (an editable install, or the repository on sys.path) uses the
folders at the repository root, where users see and edit them. Nothing here imports more than pathlib, so the
command line can call it before anything heavy loads.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
#: The repository's top-level folders that a wheel carries, under packinfer_bench/_data/.
DATA_FOLDERS = ("traces", "experiments")


def data_dir(name: str) -> Path:
    """The installed copy of the repository folder `name` (one of DATA_FOLDERS), else the checkout's own."""
    if name not in DATA_FOLDERS:
        raise ValueError(f"{name!r} is not a shipped data folder; allowed: {', '.join(DATA_FOLDERS)}")
    packaged = PACKAGE / "_data" / name
    return packaged if packaged.is_dir() else PACKAGE.parent / name


def checkout_root() -> Path | None:
    """The repository root when the package runs from a source checkout, else None (an installed wheel)."""
    root = PACKAGE.parent
    return root if (root / "pyproject.toml").is_file() and (root / "kernels" / "pyproject.toml").is_file() else None


def find_experiment(path: Path) -> Path:
    """`path` when it exists; else the shipped experiment it names, so that `run experiments/h100.yaml` (or
    `run h100.yaml`, `run h100`) works from any folder; else `path` unchanged for the caller's not-found error."""
    if path.exists() or path.is_absolute():
        return path
    parts = path.parts
    relative = Path(*parts[1:]) if len(parts) > 1 and parts[0] == "experiments" else path
    candidates = [relative] if relative.suffix else [relative, relative.with_suffix(".yaml")]
    for candidate in candidates:
        shipped = data_dir("experiments") / candidate
        if shipped.is_file():
            return shipped
    return path

"""Opening a run folder for writing: a unique new folder or an existing one to resume, one writer at a time (a
lock file naming its holder), and the config it was measured with remembered, so a resume with another config
is refused instead of mixing two experiments' records in one folder."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from packinfer_bench.errors import PackinferBenchError
from packinfer_bench.run_folder.files import CONFIG_FILE, ENV_FILE, SESSIONS_FILE
from packinfer_bench.run_folder.store import JsonLines, write_atomic

LOCK_FILE = "run.lock"


def config_hash(config: dict) -> str:
    """sha256 of a resolved config (canonical JSON)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def changed_keys(old: object, new: object, where: str = "") -> list[str]:
    """Dotted paths where two plain (YAML) configs differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{where}.{key}" if where else str(key)
            if key not in old or key not in new:
                out.append(path)
            else:
                out += changed_keys(old[key], new[key], path)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [p for i, (a, b) in enumerate(zip(old, new)) for p in changed_keys(a, b, f"{where}[{i}]")]
    return [] if old == new else [where or "(whole config)"]


class RunLock:
    """An exclusive lock on a run folder: a file created atomically, holding pid, host and start time. A lock
    left by a process that no longer runs on this host is taken over (with a warning)."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK_FILE
        self.held = False

    def acquire(self, log=print) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                self._create(me)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and not self._stale(holder):
                    raise PackinferBenchError(
                        f"{self.path.parent} is in use by another run (pid {holder.get('pid')} on "
                        f"{holder.get('host')}, started {holder.get('started')}); wait for it, or remove "
                        f"{self.path} if that process is gone") from None
                log(f"run folder: taking over a stale lock ({self.path}: {holder})")
                self.path.unlink(missing_ok=True)
                continue
            self.held = True
            return
        raise PackinferBenchError(f"could not lock {self.path.parent}: another run keeps taking it")

    def _create(self, me: dict) -> None:
        """Create the lock file with its holder already in it (FileExistsError if there is one): written to a
        private file first and hard-linked into place, so a second run never reads a lock that exists but is still
        empty and takes it for a stale one. Where the file system has no hard links: exclusive create, then write."""
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(me), encoding="utf-8")
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            raise
        except OSError:  # no hard links here
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
        finally:
            tmp.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # unreadable (written without hard links and torn by a kill): treated as stale

    @staticmethod
    def _stale(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return False  # cannot tell from here
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, ValueError, TypeError):
            return False
        return False


@dataclass
class RunFolder:
    """A run folder open for writing (the lock is held until close())."""

    path: Path
    lock: RunLock

    def close(self) -> None:
        self.lock.release()

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def new_run_path(base: Path) -> Path:
    """A new, unique folder under base named by the time (a suffix when another run took that name)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    _mkdirs(base)
    for n in range(1, 1000):
        path = base / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
        except OSError as e:
            raise PackinferBenchError(f"cannot create the run folder {path}: {e.strerror}") from None
    raise PackinferBenchError(f"{base}: too many runs started at {stamp}")


def open_run_folder(path: Path, config: dict, env: dict, *, resume: bool, measures: bool = True,
                    log=print) -> RunFolder:
    """Lock `path` (created if needed) and check or record the config it is measured with; record this session's
    environment (every session goes to sessions.jsonl; env.json is the first measuring session's and is never
    overwritten). A session that `measures` nothing (a dry run, often on another machine) is listed as such and
    leaves env.json to the session that measures, whose numbers it describes."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PackinferBenchError(f"output folder {path} is a file")
    _mkdirs(path)
    if not os.access(path, os.W_OK | os.X_OK):
        raise PackinferBenchError(f"cannot write to the output folder {path}: permission denied")
    if not resume and any(path.iterdir()):
        raise PackinferBenchError(f"output folder {path} is not empty: pass --resume to continue it, or another "
                                  "--out")
    lock = RunLock(path)
    lock.acquire(log)
    try:
        _check_config(path, config)
        if not (path / CONFIG_FILE).exists():
            write_atomic(path / CONFIG_FILE, f"# config sha256 {config_hash(config)}\n"
                         + yaml.safe_dump(config, sort_keys=False))
        if measures and not (path / ENV_FILE).exists():
            write_atomic(path / ENV_FILE, json.dumps(env, indent=2) + "\n")
        JsonLines(path / SESSIONS_FILE).append([{"started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                 "config_sha256": config_hash(config), "env": env}
                                                | ({} if measures else {"dry_run": True})])
    except BaseException:
        lock.release()
        raise
    return RunFolder(path, lock)


def _check_config(path: Path, config: dict) -> None:
    stored = path / CONFIG_FILE
    if not stored.exists():
        return
    try:
        old = yaml.safe_load(stored.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise PackinferBenchError(f"{stored} is not readable YAML ({e}); start a new run folder") from None
    new = json.loads(json.dumps(config, default=str))
    old = json.loads(json.dumps(old, default=str))
    diff = [k for k in changed_keys(old, new) if not k.startswith("output")]
    if diff:
        shown = ", ".join(diff[:8]) + (f" and {len(diff) - 8} more" if len(diff) > 8 else "")
        raise PackinferBenchError(f"--resume: the config differs from the one {path} was measured with "
                                  f"({CONFIG_FILE}): changed {shown}; restore it or start a new run (--out)")


def _mkdirs(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise PackinferBenchError(f"cannot create the output folder {path}: a file is in the way") from None
    except NotADirectoryError:
        raise PackinferBenchError(f"cannot create the output folder {path}: a part of the path is a file") from None
    except PermissionError:
        raise PackinferBenchError(f"cannot create the output folder {path}: permission denied") from None
    except OSError as e:
        raise PackinferBenchError(f"cannot create the output folder {path}: {e.strerror}") from None

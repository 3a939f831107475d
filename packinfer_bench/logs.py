"""Logging for the harness: one logger hierarchy (`packinfer_bench.*`), shown on a rich console that the live
progress bars share (a message prints above the bars, never into them), and written to run.log in the run folder
with timestamps and full tracebacks.

The console gets the message and, for an exception, its type and first line; the traceback goes to run.log (and
to the console too when verbose). A record logged with extra={"console": False} goes to run.log only."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.text import Text

ROOT = "packinfer_bench"
#: The run folder's log file: every session's messages, appended on --resume.
RUN_LOG = "run.log"
FILE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

_STYLES = {logging.WARNING: "yellow", logging.ERROR: "bold red", logging.CRITICAL: "bold red"}


@functools.cache
def console() -> Console:
    """The console that log messages and progress bars share (stderr: stdout is left to results and tables)."""
    return Console(stderr=True, soft_wrap=True, highlight=False)


class ConsoleHandler(logging.Handler):
    """Prints each record on the shared rich console: INFO as the bare message, a warning or error with its level
    in colour; an exception as its type and first line (the whole traceback only when `tracebacks`)."""

    def __init__(self, level: int = logging.INFO, tracebacks: bool = False):
        super().__init__(level)
        self.tracebacks = tracebacks

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "console", True) and super().filter(record)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = Text(record.getMessage())
            if record.levelno >= logging.WARNING:
                text = Text.assemble((f"{record.levelname.lower()}: ", _STYLES.get(record.levelno, "")), text)
            if record.exc_info and record.exc_info[1] is not None:
                if self.tracebacks:
                    text.append("\n" + logging.Formatter().formatException(record.exc_info))
                else:
                    exc = record.exc_info[1]
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                    text.append(f" ({type(exc).__name__}: {first}; traceback in {RUN_LOG})" if first
                                else f" ({type(exc).__name__}; traceback in {RUN_LOG})")
            console().print(text, markup=False)
        except Exception:  # noqa: BLE001 -- logging must never stop a run
            self.handleError(record)


def get_logger(name: str) -> logging.Logger:
    """The logger of a harness module (`__name__`), under the packinfer_bench hierarchy."""
    return logging.getLogger(name if name.startswith(ROOT) else f"{ROOT}.{name}")


def setup_console(verbose: bool = False) -> None:
    """Show the harness's messages (INFO and up; with verbose also DEBUG and tracebacks) on the console; calling
    it again replaces the handler it added."""
    logger = logging.getLogger(ROOT)
    for handler in [h for h in logger.handlers if isinstance(h, ConsoleHandler)]:
        logger.removeHandler(handler)
    logger.addHandler(ConsoleHandler(logging.DEBUG if verbose else logging.INFO, tracebacks=verbose))
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)


@contextlib.contextmanager
def run_log(folder: Path) -> Iterator[Path]:
    """Append the harness's messages (INFO and up, timestamped, with tracebacks) to folder/run.log while the block
    runs; an exception that ends the block is logged there too before it propagates."""
    path = Path(folder) / RUN_LOG
    logger = logging.getLogger(ROOT)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    handler.setLevel(logging.INFO)
    old_level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield path
    except BaseException as e:
        logger.error("run stopped: %s: %s", type(e).__name__, e, exc_info=not isinstance(e, KeyboardInterrupt),
                     extra={"console": False})
        raise
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(old_level)

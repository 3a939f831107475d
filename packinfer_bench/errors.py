"""Error types the harness raises for bad user input (traces, configs)."""


class PackinferBenchError(Exception):
    """Base class: bad input that the user can fix; the message says what and where."""


class TraceError(PackinferBenchError, ValueError):
    """A trace file or trace spec is unusable (message names the file and line when there is one)."""


class ConfigError(PackinferBenchError, ValueError):
    """An experiment config is invalid (message names the key, the bad value and what is allowed)."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """An exception's first message line, cut to `limit` characters, for a record's reason."""
    lines = str(error).splitlines()
    return lines[0][:limit] if lines else ""

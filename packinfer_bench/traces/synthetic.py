"""Seeded synthetic traces for sweeps: prompt and output lengths from named distributions, optional Poisson
arrivals, optional shared system prompts.

A length distribution is a dict with `dist` and its parameters:
  {dist: constant, value}                         every request the same
  {dist: uniform, low, high}                      integers in [low, high]
  {dist: lognormal, median, sigma[, min, max]}    exp(N(log median, sigma)), clipped
  {dist: zipf, a[, min, max]}                     min * Zipf(a), clipped (heavy tail)
  {dist: bimodal, long, short, num_long | long_fraction}
                                                  "one long + many short": exactly num_long long requests at
                                                  random positions, or each long with probability long_fraction
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from packinfer_bench.errors import TraceError
from packinfer_bench.traces.base import Trace
from packinfer_bench.traces.limits import (
    MAX_RATE,
    MAX_SYNTHETIC_REQUESTS,
    MAX_TOKENS,
    MIN_RATE,
    TOKENS_WHY,
    Error,
    check_float,
    check_int,
    check_mapping,
    check_seed,
)

PARAMS: dict[str, tuple[set[str], set[str]]] = {  # dist -> (required, optional)
    "constant": ({"value"}, set()),
    "uniform": ({"low", "high"}, set()),
    "lognormal": ({"median", "sigma"}, {"min", "max"}),
    "zipf": ({"a"}, {"min", "max"}),
    "bimodal": ({"long", "short"}, {"num_long", "long_fraction"}),
}


#: Integer-valued parameters (token counts, except num_long: a request count).
INT_PARAMS = {"value", "low", "high", "min", "max", "long", "short"}
OPTIONS = ("num_requests", "prompt", "output", "seed", "rate", "prefix")


def _trace_error(name: str) -> Error:
    return lambda key, detail: TraceError(f"synthetic trace {name!r}: {key}: {detail}")


def check_dist(spec: object, n: int, what: str, error: Error) -> dict[str, float]:
    """Check a distribution spec (see the module docstring) for n requests; its parameters as numbers."""
    spec = check_mapping(spec, what, error)
    dist = spec.get("dist")
    if not isinstance(dist, str) or dist not in PARAMS:
        raise error(f"{what}.dist", f"unknown distribution {dist!r:.80}; allowed: {sorted(PARAMS)}")
    required, optional = PARAMS[dist]
    keys = set(spec) - {"dist"}
    if not required <= keys or not keys <= required | optional:
        raise error(what, f"{dist} takes {sorted(required)} and optionally {sorted(optional)}, "
                          f"got {sorted(map(str, keys))}")
    p: dict[str, float] = {}
    for k in sorted(keys):
        key, v = f"{what}.{k}", spec[k]
        if k in INT_PARAMS:
            p[k] = check_int(v, key, 1, MAX_TOKENS, f"a length in tokens; {TOKENS_WHY}", error)
        elif k == "num_long":
            p[k] = check_int(v, key, 0, n, f"at most num_requests ({n})", error)
        elif k == "long_fraction":
            p[k] = check_float(v, key, 0.0, 1.0, why="a probability", error=error)
        elif k == "median":
            p[k] = check_float(v, key, 0.0, MAX_TOKENS, lo_open=True, why="a length in tokens", error=error)
        elif k == "sigma":
            p[k] = check_float(v, key, 0.0, 10.0, why="of log-lengths: 10 already spans 1 to e**40", error=error)
        elif k == "a":
            p[k] = check_float(v, key, 1.0, 100.0, lo_open=True, why="Zipf's exponent", error=error)
    if dist == "uniform" and p["low"] > p["high"]:
        raise error(what, f"uniform needs low <= high, got {int(p['low'])} > {int(p['high'])}")
    if p.get("min", 1) > p.get("max", MAX_TOKENS):
        raise error(what, f"{dist} needs min <= max, got {int(p['min'])} > {int(p['max'])}")
    if dist == "bimodal" and ("num_long" in p) == ("long_fraction" in p):
        raise error(what, "bimodal takes exactly one of num_long, long_fraction")
    return p


def check_options(options: Mapping[str, object], error: Error) -> None:
    """Check a synthetic trace's options (load's keyword arguments) before anything is generated."""
    unknown = [k for k in options if k not in OPTIONS]
    if unknown:
        raise error(str(unknown[0]), f"unknown option; allowed: {list(OPTIONS)}")
    if "num_requests" not in options:
        raise error("num_requests", "required option is missing")
    n = check_int(options["num_requests"], "num_requests", 1, MAX_SYNTHETIC_REQUESTS,
                  "the trace is generated in memory at once", error)
    if "prompt" not in options:
        raise error("prompt", "required option is missing (a length distribution, e.g. {dist: constant, value: 512})")
    prompt = check_dist(options["prompt"], n, "prompt", error)
    if options.get("output") is not None:
        check_dist(options["output"], n, "output", error)
    check_seed(options.get("seed", 0), "seed", error)
    if options.get("rate") is not None:
        check_float(options["rate"], "rate", MIN_RATE, MAX_RATE, why="Poisson arrivals, requests/s", error=error)
    prefix = options.get("prefix")
    if prefix:
        prefix = check_mapping(prefix, "prefix", error)
        unknown = [k for k in prefix if k not in ("groups", "length")]
        if unknown or "groups" not in prefix or "length" not in prefix:
            raise error("prefix", f"takes 'groups' and 'length', got {sorted(map(str, prefix))}")
        check_int(prefix["groups"], "prefix.groups", 1, n, f"shared prompts, at most num_requests ({n})", error)
        largest = max(prompt.get(k, 0) for k in ("value", "high", "long", "short", "max")) or 1
        check_int(prefix["length"], "prefix.length", 1, MAX_TOKENS - int(largest),
                  f"tokens added to every prompt, whose longest is {int(largest)} tokens; a prompt is at most "
                  f"{MAX_TOKENS} ({TOKENS_WHY})", error)


def sample_lengths(spec: Mapping[str, object], n: int, rng: np.random.Generator, what: str,
                   error: Error | None = None, cap: int = MAX_TOKENS) -> np.ndarray:
    """Draw n positive integer lengths from a distribution spec (see the module docstring), clipped to
    [min, max] and to `cap`."""
    error = error or (lambda key, detail: TraceError(f"{key}: {detail}"))
    dist = check_mapping(spec, what, error).get("dist")
    p = check_dist(spec, n, what, error)
    lo, hi = min(p.get("min", 1), cap), min(p.get("max", MAX_TOKENS), cap)
    if dist == "constant":
        out = np.full(n, p["value"])
    elif dist == "uniform":
        out = rng.integers(int(p["low"]), int(p["high"]) + 1, size=n)
    elif dist == "lognormal":
        with np.errstate(over="ignore"):
            out = np.exp(rng.normal(np.log(p["median"]), p["sigma"], size=n))
    elif dist == "zipf":
        out = p.get("min", 1) * rng.zipf(p["a"], size=n).astype(np.float64)
    else:
        if "num_long" in p:
            is_long = np.zeros(n, dtype=bool)
            is_long[rng.choice(n, size=int(p["num_long"]), replace=False)] = True
        else:
            is_long = rng.random(n) < p["long_fraction"]
        out = np.where(is_long, p["long"], p["short"])
    out = np.clip(np.round(out), lo, hi).astype(np.int64)
    if (out <= 0).any():
        raise error(what, f"{dist} produced a length <= 0; lengths must be positive")
    return out


def load(path: None = None, *, name: str, num_requests: int, prompt: Mapping[str, object],
         output: Mapping[str, object] | None = None, seed: int = 0, rate: float | None = None,
         prefix: Mapping[str, int] | None = None) -> Trace:
    """A synthetic trace of `num_requests` requests (path: unused, synthetic traces have no file).

    rate: Poisson arrivals at this many requests/s (none: no timestamps).
    prefix: {groups: G, length: P}: each request gets one of G shared system prompts of P tokens (added to its
    prompt), so shared-prefix batches can be swept.
    """
    error = _trace_error(name)
    check_options({"num_requests": num_requests, "prompt": prompt, "output": output, "seed": seed, "rate": rate,
                   "prefix": prefix}, error)
    rng = np.random.default_rng(seed)
    shared = int(prefix["length"]) if prefix else 0
    prompt_len = sample_lengths(prompt, num_requests, rng, "prompt", error, cap=MAX_TOKENS - shared)
    output_len = sample_lengths(output or {"dist": "constant", "value": 128}, num_requests, rng, "output", error)
    requests = pd.DataFrame({"prompt_len": prompt_len, "output_len": output_len})
    if rate is not None:
        gaps = rng.exponential(1.0 / rate, size=num_requests)
        requests["arrival_s"] = np.cumsum(gaps) - gaps[0]
    if prefix:
        requests["prefix_id"] = rng.integers(0, int(prefix["groups"]), size=num_requests)
        requests["prefix_len"] = int(prefix["length"])
        requests["prompt_len"] += shared
        alone = requests.groupby("prefix_id")["prefix_id"].transform("size") == 1
        requests.loc[alone, ["prefix_id", "prefix_len"]] = [-1, 0]
    params = {"num_requests": num_requests, "prompt": dict(prompt), "output": dict(output or {}), "seed": seed,
              "rate": rate, "prefix": dict(prefix or {})}
    return Trace(name=name, kind="synthetic", requests=requests, source=f"synthetic {params}",
                 licence="n/a (generated)", tokenizer="n/a (lengths drawn directly)", notes={"params": params})

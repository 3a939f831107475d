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

PARAMS: dict[str, tuple[set[str], set[str]]] = {  # dist -> (required, optional)
    "constant": ({"value"}, set()),
    "uniform": ({"low", "high"}, set()),
    "lognormal": ({"median", "sigma"}, {"min", "max"}),
    "zipf": ({"a"}, {"min", "max"}),
    "bimodal": ({"long", "short"}, {"num_long", "long_fraction"}),
}


def sample_lengths(spec: Mapping[str, object], n: int, rng: np.random.Generator, what: str) -> np.ndarray:
    """Draw n positive integer lengths from a distribution spec (see the module docstring)."""
    dist = spec.get("dist")
    if dist not in PARAMS:
        raise TraceError(f"{what}.dist: unknown distribution {dist!r}; allowed: {sorted(PARAMS)}")
    required, optional = PARAMS[dist]
    keys = set(spec) - {"dist"}
    if not required <= keys or not keys <= required | optional:
        raise TraceError(f"{what}: {dist} takes {sorted(required)} and optionally {sorted(optional)}, "
                         f"got {sorted(keys)}")
    p = {k: float(v) for k, v in spec.items() if k != "dist"}
    lo, hi = p.get("min", 1), p.get("max", np.inf)
    if dist == "constant":
        out = np.full(n, p["value"])
    elif dist == "uniform":
        if p["low"] > p["high"]:
            raise TraceError(f"{what}: uniform needs low <= high, got {p['low']} > {p['high']}")
        out = rng.integers(int(p["low"]), int(p["high"]) + 1, size=n)
    elif dist == "lognormal":
        out = np.exp(rng.normal(np.log(p["median"]), p["sigma"], size=n))
    elif dist == "zipf":
        if p["a"] <= 1:
            raise TraceError(f"{what}: zipf needs a > 1, got {p['a']}")
        out = p.get("min", 1) * rng.zipf(p["a"], size=n).astype(np.float64)
    else:
        if ("num_long" in p) == ("long_fraction" in p):
            raise TraceError(f"{what}: bimodal takes exactly one of num_long, long_fraction")
        if "num_long" in p:
            if not 0 <= p["num_long"] <= n:
                raise TraceError(f"{what}: num_long must lie in [0, {n}], got {int(p['num_long'])}")
            is_long = np.zeros(n, dtype=bool)
            is_long[rng.choice(n, size=int(p["num_long"]), replace=False)] = True
        else:
            is_long = rng.random(n) < p["long_fraction"]
        out = np.where(is_long, p["long"], p["short"])
    out = np.clip(np.round(out), lo, hi).astype(np.int64)
    if (out <= 0).any():
        raise TraceError(f"{what}: {dist} produced a length <= 0; lengths must be positive")
    return out


def load(path: None = None, *, name: str, num_requests: int, prompt: Mapping[str, object], output: Mapping[str, object] | None = None,
             seed: int = 0, rate: float | None = None, prefix: Mapping[str, int] | None = None) -> Trace:
    """A synthetic trace of `num_requests` requests (path: unused, synthetic traces have no file).

    rate: Poisson arrivals at this many requests/s (none: no timestamps).
    prefix: {groups: G, length: P}: each request gets one of G shared system prompts of P tokens (added to its
    prompt), so shared-prefix batches can be swept.
    """
    if num_requests <= 0:
        raise TraceError(f"synthetic trace {name!r}: num_requests must be > 0, got {num_requests}")
    rng = np.random.default_rng(seed)
    prompt_len = sample_lengths(prompt, num_requests, rng, "prompt")
    output_len = sample_lengths(output or {"dist": "constant", "value": 128}, num_requests, rng, "output")
    requests = pd.DataFrame({"prompt_len": prompt_len, "output_len": output_len})
    if rate is not None:
        if rate <= 0:
            raise TraceError(f"synthetic trace {name!r}: rate must be > 0 requests/s, got {rate}")
        gaps = rng.exponential(1.0 / rate, size=num_requests)
        requests["arrival_s"] = np.cumsum(gaps) - gaps[0]
    if prefix:
        unknown = set(prefix) - {"groups", "length"}
        if unknown or int(prefix.get("groups", 0)) <= 0 or int(prefix.get("length", 0)) <= 0:
            raise TraceError(f"synthetic trace {name!r}: prefix takes positive 'groups' and 'length', got {dict(prefix)}")
        requests["prefix_id"] = rng.integers(0, int(prefix["groups"]), size=num_requests)
        requests["prefix_len"] = int(prefix["length"])
        requests["prompt_len"] += int(prefix["length"])
        alone = requests.groupby("prefix_id")["prefix_id"].transform("size") == 1
        requests.loc[alone, ["prefix_id", "prefix_len"]] = [-1, 0]
    params = {"num_requests": num_requests, "prompt": dict(prompt), "output": dict(output or {}), "seed": seed,
              "rate": rate, "prefix": dict(prefix or {})}
    return Trace(name=name, kind="synthetic", requests=requests, source=f"synthetic {params}", licence="n/a (generated)",
                 tokenizer="n/a (lengths drawn directly)", notes={"params": params})

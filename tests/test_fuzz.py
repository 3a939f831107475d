"""Hostile input (issue 14): every bad config or trace is a clear ConfigError / TraceError naming the key or the
file and line, never another exception, a hang or a silently empty run.

Three parts: table-driven config cases (smoke.yaml with one edit -> ConfigError naming the key), table-driven
trace cases (a small bad file -> TraceError naming file:line), and a seeded, time-bounded random fuzz of both
(mutated smoke.yaml values; random bytes in small trace files).
"""

from __future__ import annotations

import codecs
import copy
import itertools
import json
import math
import random
import re
import signal
import time
from contextlib import contextmanager

import pytest
import yaml
from conftest import FIXTURES, REPO

from packinfer_bench.config import load_config
from packinfer_bench.errors import ConfigError, TraceError
from packinfer_bench.traces import Trace, load_trace
from packinfer_bench.workload import ContinuousSpec, StaticSpec, continuous_batches, static_batches

SMOKE = (REPO / "experiments" / "smoke.yaml").read_text(encoding="utf-8")


class Hang(BaseException):
    """Raised by time_limit: a BaseException, so that no `except Exception` in the code under test eats it."""


@contextmanager
def time_limit(seconds: float, what: str):
    """Fail (Hang) if the block runs longer than `seconds` (SIGALRM; checked between Python bytecodes)."""

    def alarm(signum, frame):
        raise Hang(f"{what}: still running after {seconds} s (a hang?)")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --- config cases: smoke.yaml with one edit -> ConfigError naming the key ------------------------------------

CONFIG_CASES = [
    # (id, old text in smoke.yaml, new text, substrings the message must hold)
    ("rate-nan", "      time_scale: 0.02", "      time_scale: 0.02\n      rate: .nan",
     ["workloads[2].continuous.rate:", "nan not allowed", "[1e-06, 1000000]"]),
    ("rate-inf-poisson", "arrivals: trace", "arrivals: poisson\n      rate: .inf",
     ["workloads[2].continuous.rate:", "inf not allowed"]),
    ("time-scale-inf", "time_scale: 0.02", "time_scale: .inf", ["workloads[2].continuous.time_scale:", "(0, 1000000]"]),
    ("time-scale-nan", "time_scale: 0.02", "time_scale: .nan", ["workloads[2].continuous.time_scale:"]),
    ("time-scale-0", "time_scale: 0.02", "time_scale: 0", ["workloads[2].continuous.time_scale:"]),
    ("time-scale-400-digits", "time_scale: 0.02", "time_scale: " + "9" * 400,
     ["workloads[2].continuous.time_scale:", "too large"]),
    ("batch-size-1e9", "batch_sizes: [4]", "batch_sizes: [1000000000]",
     ["workloads[0].static.batch_sizes[0]:", "allowed: 1..65536", "memory"]),
    ("batch-size-0", "batch_sizes: [4]", "batch_sizes: [4, 0]", ["workloads[0].static.batch_sizes[1]:"]),
    ("batch-size-float", "batch_sizes: [4]", "batch_sizes: [4.5]", ["workloads[0].static.batch_sizes[0]:"]),
    ("batch-sizes-empty", "batch_sizes: [4]", "batch_sizes: []", ["workloads[0].static.batch_sizes:"]),
    ("batch-sizes-dup", "batch_sizes: [4]", "batch_sizes: [4, 4]", ["workloads[0].static.batch_sizes[1]:", "repeats"]),
    ("static-rows", "batch_sizes: [4]", "batch_sizes: [65536]\n      batches_per_size: 100",
     ["workloads[0].static.batches_per_size:", "4000000"]),
    ("batches-per-size-0", "batch_sizes: [4]", "batch_sizes: [4]\n      batches_per_size: 0",
     ["workloads[0].static.batches_per_size:"]),
    ("decode-point-nan", "decode_points: [0.5]", "decode_points: [.nan]", ["workloads[0].static.decode_points[0]:"]),
    ("decode-point-2", "decode_points: [0.5]", "decode_points: [0.5, 2]", ["workloads[0].static.decode_points[1]:"]),
    ("decode-fraction-nan", "chunk_size: 64", "chunk_size: 64\n      decode_fraction: .nan",
     ["workloads[0].static.decode_fraction:"]),
    ("chunk-size-0", "chunk_size: 64", "chunk_size: 0", ["workloads[0].static.chunk_size:"]),
    ("max-len-neg", "max_len: 256", "max_len: -1", ["workloads[0].static.max_len:"]),
    ("phase-dup", "phases: [prefill, decode, mixed]", "phases: [prefill, prefill]", ["workloads[0].static.phases[1]:"]),
    ("phases-empty", "phases: [prefill, decode, mixed]", "phases: []", ["workloads[0].static.phases:"]),
    ("static-seed-neg", "max_len: 256\n      seed: 0", "max_len: 256\n      seed: -1",
     ["workloads[0].static.seed:", "0..2**63-1"]),
    ("repeats-0", "repeats: 1", "repeats: 0", ["timing.repeats:", "allowed: 1..100000"]),
    ("warmup-neg", "warmup: 0", "warmup: -1", ["timing.warmup:"]),
    ("backends-dup", "backends: [fa2, sdpa_padded, flex, flashinfer, triton_unpacked, packinfer]",
     "backends: [packinfer, packinfer]", ["backends[1]:", "'packinfer' repeats backends[0]"]),
    ("continuous-num-requests-neg", "num_requests: 12", "num_requests: -3",
     ["workloads[2].continuous.num_requests:", "allowed: 1.."]),
    ("continuous-num-requests-0", "num_requests: 12", "num_requests: 0", ["workloads[2].continuous.num_requests:"]),
    ("continuous-start-neg", "num_requests: 12", "num_requests: 12\n      start: -5",
     ["workloads[2].continuous.start:"]),
    ("max-iterations-0", "max_iterations: 6", "max_iterations: 0", ["workloads[2].continuous.max_iterations:"]),
    ("max-kv-tokens-0", "max_iterations: 6", "max_iterations: 6\n      max_kv_tokens: 0",
     ["workloads[2].continuous.max_kv_tokens:"]),
    ("max-num-seqs-huge", "max_num_seqs: 8", "max_num_seqs: 100000000", ["workloads[2].continuous.max_num_seqs:"]),
    ("max-num-batched-tokens-0", "max_num_batched_tokens: 1024", "max_num_batched_tokens: 0",
     ["workloads[2].continuous.max_num_batched_tokens:"]),
    ("every-0", "max_iterations: 6", "max_iterations: 6\n      every: 0", ["workloads[2].continuous.every:"]),
    ("step-time-neg", "max_iterations: 6", "max_iterations: 6\n      step_time: {base_ms: -1}",
     ["workloads[2].continuous.step_time.base_ms:"]),
    ("step-time-nan", "max_iterations: 6", "max_iterations: 6\n      step_time: {per_kv_token_ns: .nan}",
     ["workloads[2].continuous.step_time.per_kv_token_ns:"]),
    ("continuous-seed-huge", "max_iterations: 6\n      seed: 0",
     "max_iterations: 6\n      seed: 99999999999999999999999", ["workloads[2].continuous.seed:"]),
    ("arrivals-bad", "arrivals: trace", "arrivals: closed", ["workloads[2].continuous.arrivals:"]),
    ("synthetic-num-requests-str", "num_requests: 8", 'num_requests: "8"',
     ["traces[3].options.num_requests:", "expected an integer, got '8'"]),
    ("synthetic-num-requests-huge", "num_requests: 8", "num_requests: 1000000000000",
     ["traces[3].options.num_requests:", "in memory"]),
    ("synthetic-num-requests-missing", "      num_requests: 8\n", "", ["traces[3].options.num_requests:"]),
    ("synthetic-value-abc", "value: 16}", "value: abc}", ["traces[3].options.output.value:", "'abc'"]),
    ("synthetic-value-float", "value: 16}", "value: 16.5}", ["traces[3].options.output.value:"]),
    ("synthetic-value-huge", "value: 16}", "value: 100000000000000000000}", ["traces[3].options.output.value:"]),
    ("synthetic-long-neg", "long: 300", "long: -300", ["traces[3].options.prompt.long:"]),
    ("synthetic-num-long-over", "num_long: 1}", "num_long: 9}", ["traces[3].options.prompt.num_long:", "0..8"]),
    ("synthetic-sigma-nan", "prompt: {dist: bimodal, long: 300, short: 17, num_long: 1}",
     "prompt: {dist: lognormal, median: 100, sigma: .nan}", ["traces[3].options.prompt.sigma:"]),
    ("synthetic-zipf-a-1", "prompt: {dist: bimodal, long: 300, short: 17, num_long: 1}",
     "prompt: {dist: zipf, a: 1}", ["traces[3].options.prompt.a:"]),
    ("synthetic-uniform-order", "prompt: {dist: bimodal, long: 300, short: 17, num_long: 1}",
     "prompt: {dist: uniform, low: 9, high: 3}", ["traces[3].options.prompt:", "low <= high"]),
    ("synthetic-dist-unknown", "dist: constant", "dist: normal", ["traces[3].options.output.dist:"]),
    ("synthetic-prompt-not-mapping", "prompt: {dist: bimodal, long: 300, short: 17, num_long: 1}", "prompt: 5",
     ["traces[3].options.prompt:", "expected a mapping"]),
    ("synthetic-seed-neg", "output: {dist: constant, value: 16}", "output: {dist: constant, value: 16}\n      seed: -1",
     ["traces[3].options.seed:"]),
    ("synthetic-rate-nan", "output: {dist: constant, value: 16}",
     "output: {dist: constant, value: 16}\n      rate: .nan", ["traces[3].options.rate:"]),
    ("synthetic-prefix-length-0", "output: {dist: constant, value: 16}",
     "output: {dist: constant, value: 16}\n      prefix: {groups: 1, length: 0}", ["traces[3].options.prefix.length:"]),
    ("synthetic-unknown-option", "output: {dist: constant, value: 16}",
     "output: {dist: constant, value: 16}\n      colour: red", ["traces[3].options.colour:", "unknown option"]),
    ("mooncake-block-size-0", "    source: mooncake-conv", "    source: mooncake-conv\n    options: {block_size: 0}",
     ["traces[2].options.block_size:"]),
    ("sharegpt-max-conversations", "    source: sharegpt", "    source: sharegpt\n    options: {max_conversations: -1}",
     ["traces[0].options.max_conversations:"]),
    ("azure-option", "    source: azure-conv", "    source: azure-conv\n    options: {block_size: 4}",
     ["traces[1].options.block_size:", "unknown option"]),
    ("trace-kind-unknown", "kind: synthetic", "kind: parquet", ["traces[3].kind:"]),
    ("trace-source-missing", "    source: sharegpt\n", "    kind: sharegpt\n", ["traces[0].source:"]),
    ("trace-name-slash", "  - name: straggler", "  - name: a/b", ["traces[3].name:", "'/'"]),
    ("experiment-name-dotdot", "name: smoke", "name: ../../x", ["name:", "plain folder name"]),
    ("experiment-name-absolute", "name: smoke", "name: /tmp/x", ["name:", "plain folder name"]),
    ("experiment-name-dot", "name: smoke", "name: .", ["name:", "plain folder name"]),
    ("workload-traces-dup", "traces: [mooncake-conv]", "traces: [mooncake-conv, mooncake-conv]",
     ["workloads[1].traces[1]:"]),
    ("shape-heads-huge", "num_heads: 4", "num_heads: 100000", ["shapes[0].num_heads:"]),
    ("shape-kv-heads-0", "num_kv_heads: 2", "num_kv_heads: 0", ["shapes[0].num_kv_heads:"]),
    ("gpu-sms-0", "device: cpu\n", "device: cpu\ngpu: {name: X, sms: 0}\n", ["gpu.sms:"]),
    ("gpu-bandwidth-nan", "device: cpu\n", "device: cpu\ngpu: {name: X, sms: 4, hbm_tbps: .nan}\n", ["gpu.hbm_tbps:"]),
    ("e2e-rate-nan", "rates: [50.0]", "rates: [.nan]", ["e2e[0].rates[0]:"]),
    ("e2e-rate-dup", "rates: [50.0]", "rates: [50.0, 50.0]", ["e2e[0].rates[1]:"]),
    ("e2e-backends-dup", "backends: [fa2, flashinfer, packinfer]", "backends: [packinfer, packinfer]",
     ["e2e[0].backends[1]:"]),
    ("e2e-verify-neg", "verify_iterations: 3", "verify_iterations: -1", ["e2e[0].verify_iterations:"]),
    ("e2e-continuous-max-kv", "max_kv_tokens: 2048}", "max_kv_tokens: -2048}", ["e2e[0].continuous.max_kv_tokens:"]),
    ("e2e-seed", "verify_iterations: 3", "verify_iterations: 3\n    seed: -1", ["e2e[0].seed:"]),
    ("output-dir-empty", "timing: {warmup: 0, repeats: 1, flush_l2: false}",
     "timing: {warmup: 0, repeats: 1, flush_l2: false}\noutput: {dir: ''}", ["output.dir:"]),
    ("yaml-duplicate-top-key", "device: cpu\n", "device: cpu\ndevice: cuda\n",
     [":6: duplicate key 'device' (first on line 5)"]),
    ("yaml-duplicate-nested-key", "      chunk_size: 64\n", "      chunk_size: 64\n      chunk_size: 32\n",
     [":27: duplicate key 'chunk_size' (first on line 26)"]),
]


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_value_is_a_config_error_naming_the_key(tmp_path, case):
    _, old, new, expected = case
    assert old in SMOKE
    path = tmp_path / "c.yaml"
    path.write_text(SMOKE.replace(old, new, 1), encoding="utf-8")
    with time_limit(10, case[0]), pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"
    assert message.startswith(str(path)), message


def test_shipped_configs_still_load():
    for path in sorted((REPO / "experiments").glob("*.yaml")):
        load_config(path)


def test_unreadable_configs(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    path = tmp_path / "c.yaml"
    path.write_bytes(codecs.BOM_UTF16_LE + SMOKE.encode("utf-16-le"))
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(path)
    path.write_text("[" * 5000, encoding="utf-8")
    with time_limit(10, "deep yaml"), pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


# --- workload cases that need the trace: errors, not an empty run, and no hang ----------------------------------

def _trace(prompts, outputs, arrivals=None):
    import pandas as pd

    df = pd.DataFrame({"prompt_len": prompts, "output_len": outputs})
    if arrivals is not None:
        df["arrival_s"] = arrivals
    return Trace(name="t", kind="test", requests=df, source="test", licence="n/a", tokenizer="n/a")


def test_a_kv_budget_below_every_request_is_an_error_not_an_empty_replay():
    trace = _trace([10, 20], [5, 5], [0.0, 0.1])
    with pytest.raises(ConfigError, match=r"continuous\.max_kv_tokens: 5 is smaller than the smallest replayed "
                                          r"request of trace 't' \(prompt \+ output = 15 tokens\)"):
        list(continuous_batches(trace, ContinuousSpec(max_kv_tokens=5)))
    with pytest.raises(ConfigError, match=r"continuous\.max_num_batched_tokens: 4 is smaller than the shortest "
                                          r"replayed prompt"):
        list(continuous_batches(trace, ContinuousSpec(max_num_batched_tokens=4, chunked_prefill=False)))
    assert len(list(continuous_batches(trace, ContinuousSpec(max_kv_tokens=15)))) > 0  # one request fits


@pytest.mark.parametrize("kwargs, key", [
    ({"arrivals": "poisson", "rate": math.nan}, "rate"),
    ({"arrivals": "poisson", "rate": math.inf}, "rate"),
    ({"time_scale": math.nan}, "time_scale"),
    ({"time_scale": math.inf}, "time_scale"),
    ({"num_requests": -3}, "num_requests"),
    ({"max_iterations": 0}, "max_iterations"),
    ({"seed": -1}, "seed"),
    ({"start": True}, "start"),
])
def test_continuous_spec_rejects_values_that_hung_or_misled(kwargs, key):
    with time_limit(5, str(kwargs)), pytest.raises(ConfigError, match=rf"^{key}: "):
        ContinuousSpec(**kwargs)


def test_static_spec_rejects_a_huge_batch_before_allocating():
    with time_limit(5, "huge batch"), pytest.raises(ConfigError, match=r"^batch_sizes\[0\]: 1000000000 not allowed"):
        StaticSpec(batch_sizes=[10**9])


# --- trace cases: a bad file -> TraceError naming the file and line -------------------------------------------

AZURE = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,374,44\n2023-11-16 18:15:50.99,396,109\n"


def _moon(**fields) -> str:
    return json.dumps({"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [0], **fields})


CONVERSATION = {"conversations": [{"from": "human", "value": "hello there"}, {"from": "gpt", "value": "hi"}]}

TRACE_CASES = [
    # (id, file name, bytes, kind (None: detect), line, substring of the message)
    ("binary-csv", "t.csv", bytes(range(256)) * 4, None, 1, "NUL byte"),
    ("binary-csv-as-azure", "t.csv", AZURE.encode() + bytes(range(256)), "azure", 4, "NUL byte"),
    ("png-json", "t.json", b"\x89PNG\r\n\x1a\n" + bytes(64), None, 3, "NUL byte"),
    ("utf16-csv", "t.csv", AZURE.encode("utf-16"), None, 1, "UTF-16"),
    ("utf16-jsonl", "t.jsonl", (_moon() + "\n").encode("utf-16"), None, 1, "UTF-16"),
    ("utf16-as-mooncake", "t.jsonl", (_moon() + "\n").encode("utf-16"), "mooncake", 1, "UTF-16"),
    ("utf16-no-bom", "t.csv", AZURE.encode("utf-16-le"), None, 1, "UTF-16"),
    ("latin1-csv", "t.csv", AZURE.replace("396", "3\xe96").encode("latin-1"), None, 3, "not UTF-8"),
    ("latin1-late", "t.csv", (AZURE * 1).encode() + "2023-11-16 18:15:52,\xe9,1\n".encode("latin-1"), "azure", 4,
     "not UTF-8"),
    ("sharegpt-list-of-ints", "t.json", b'[1, 2, {"conversations": []}]', None, 1, "expected a conversation"),
    ("sharegpt-int-on-line-3", "t.json", ("[\n " + json.dumps(CONVERSATION) + ",\n 2\n]").encode(), None, 3,
     "expected a conversation"),
    ("sharegpt-jsonl-list", "t.jsonl", (json.dumps(CONVERSATION) + "\n[1]\n").encode(), None, 2,
     "expected a JSON object"),
    ("sharegpt-not-a-list", "t.json", b'{"conversations": 1}', "sharegpt", 1, "expected a JSON list"),
    ("sharegpt-bad-json", "t.json", ("[\n " + json.dumps(CONVERSATION) + ",\n {\"conv\n]").encode(), "sharegpt", 3,
     "not valid JSON"),
    ("sharegpt-deep", "t.json", b"[" * 100_000, "sharegpt", 1, "JSON"),
    ("sharegpt-turn-not-dict", "t.json", b'[{"conversations": [1]}]', None, 1, "each turn needs"),
    ("sharegpt-counts-fraction", "t.csv", b"num_prefill_tokens,num_decode_tokens\n10,5\n7,2.5\n", None, 3,
     "must be an integer"),
    ("sharegpt-counts-20-digits", "t.csv", b"num_prefill_tokens,num_decode_tokens\n10,5\n12345678901234567890,2\n",
     None, 3, "above the limit of 16777216 tokens"),
    ("mooncake-hash-ids-of-lists", "t.jsonl", (_moon() + "\n" + _moon(hash_ids=[[1], [2]]) + "\n").encode(), None, 2,
     "hash_ids"),
    ("mooncake-hash-id-negative", "t.jsonl", (_moon(hash_ids=[-1]) + "\n").encode(), None, 1, "hash_ids"),
    ("mooncake-hash-id-bool", "t.jsonl", (_moon() + "\n" + _moon(hash_ids=[True]) + "\n").encode(), None, 2,
     "hash_ids"),
    ("mooncake-hash-ids-not-list", "t.jsonl", (_moon() + "\n" + _moon(hash_ids=7) + "\n").encode(), None, 2,
     "hash_ids"),
    ("mooncake-timestamp-nan", "t.jsonl", (_moon() + "\n" + _moon(timestamp=math.nan) + "\n" + _moon() + "\n").encode(),
     None, 2, "'timestamp' must be a finite number"),
    ("mooncake-timestamp-inf", "t.jsonl", (_moon() + "\n" + _moon(timestamp=math.inf) + "\n").encode(), None, 2,
     "'timestamp'"),
    ("mooncake-timestamp-string", "t.jsonl", (_moon() + "\n" + _moon(timestamp="0") + "\n").encode(), None, 2,
     "'timestamp' must be a number"),
    ("mooncake-input-fraction", "t.jsonl", (_moon() + "\n" + _moon(input_length=100.7) + "\n").encode(), None, 2,
     "'input_length' must be a whole number"),
    ("mooncake-input-20-digits", "t.jsonl",
     (_moon() + "\n" + _moon(input_length=12345678901234567890) + "\n").encode(), None, 2, "above the limit"),
    ("mooncake-output-nan", "t.jsonl", (_moon() + "\n" + _moon(output_length=math.nan) + "\n").encode(), None, 2,
     "'output_length'"),
    ("mooncake-bad-json", "t.jsonl", (_moon() + "\n" + _moon()[:20] + "\n").encode(), None, 2, "not valid JSON"),
    ("mooncake-blank", "t.jsonl", b"\n\n\n", "mooncake", 1, "no records"),
    ("azure-20-digits", "t.csv", (AZURE + "2023-11-16 18:15:51.99,12345678901234567890,3\n").encode(), None, 4,
     "above the limit of 16777216 tokens"),
    ("azure-fraction", "t.csv", (AZURE + "2023-11-16 18:15:51.99,100.7,3\n").encode(), None, 4, "must be an integer"),
    ("azure-nan", "t.csv", (AZURE + "2023-11-16 18:15:51.99,nan,3\n").encode(), None, 4, "must be an integer"),
    ("azure-mixed-time-zones", "t.csv", (AZURE + "2023-11-16 18:15:51.99+05:00,10,3\n").encode(), None, 4,
     "time zone"),
    ("azure-bad-time", "t.csv", (AZURE + "soon,10,3\n").encode(), None, 4, "not a date-time"),
    ("azure-header-only", "t.csv", AZURE.split("\n")[0].encode() + b"\n", None, 1, "no data rows"),
    ("azure-duplicate-column", "t.csv", b"TIMESTAMP,ContextTokens,GeneratedTokens,ContextTokens\n2023-11-16,1,2,3\n",
     "azure", 1, "more than once"),
    ("azure-short-row", "t.csv", (AZURE + "2023-11-16 18:15:51.99,10\n").encode(), None, 4, "expected 3 fields"),
    ("azure-huge-field", "t.csv", (AZURE + "2023-11-16 18:15:51.99," + "1" * 200_000 + ",3\n").encode(), "azure", 4,
     "CSV"),
    ("empty-file", "t.jsonl", b"", None, 1, "empty file"),
    ("unrecognised-json", "t.json", b'{\n "a": 1\n}\n', None, 1, "format not recognised"),
]


@pytest.mark.parametrize("case", TRACE_CASES, ids=[c[0] for c in TRACE_CASES])
def test_bad_trace_is_a_trace_error_naming_file_and_line(tmp_path, case):
    _, name, data, kind, line, part = case
    path = tmp_path / name
    path.write_bytes(data)
    with time_limit(10, case[0]), pytest.raises(TraceError) as info:
        load_trace(str(path), kind)
    message = str(info.value)
    assert f"{path}:{line}:" in message and part in message, message


def test_bom_prefixed_azure_csv_is_accepted(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(codecs.BOM_UTF8 + AZURE.encode())
    trace = load_trace(str(path))
    assert trace.kind == "azure" and trace.requests["prompt_len"].tolist() == [374, 396]
    path = tmp_path / "t.jsonl"
    path.write_bytes(codecs.BOM_UTF8 + (_moon() + "\n").encode())
    assert load_trace(str(path)).kind == "mooncake"


def test_a_directory_as_trace_source_says_so(tmp_path):
    with pytest.raises(TraceError, match=rf"{re.escape(str(tmp_path))} is a directory, not a trace file"):
        load_trace(str(tmp_path))


@pytest.mark.parametrize("options, key", [
    ({"num_requests": "8", "prompt": {"dist": "constant", "value": 4}}, "num_requests"),
    ({"num_requests": 4, "prompt": {"dist": "constant", "value": "abc"}}, "prompt.value"),
    ({"num_requests": 4, "prompt": {"dist": "lognormal", "median": 100, "sigma": -1}}, "prompt.sigma"),
    ({"num_requests": 4, "prompt": {"dist": "constant", "value": 4}, "seed": -1}, "seed"),
    ({"num_requests": 4, "prompt": {"dist": "constant", "value": 4}, "rate": math.nan}, "rate"),
    ({"num_requests": 10**10, "prompt": {"dist": "constant", "value": 4}}, "num_requests"),
])
def test_bad_synthetic_options_from_python_are_trace_errors(options, key):
    with time_limit(5, str(options)), pytest.raises(TraceError, match=rf"synthetic trace 's': {re.escape(key)}: "):
        load_trace(None, "synthetic", name="s", **options)


def test_synthetic_heavy_tails_stay_within_the_token_bound():
    trace = load_trace(None, "synthetic", num_requests=2000, prompt={"dist": "lognormal", "median": 1000, "sigma": 10},
                       output={"dist": "zipf", "a": 1.01}, prefix={"groups": 2, "length": 1000})
    assert trace.requests["prompt_len"].max() <= 1 << 24 and trace.requests["output_len"].max() <= 1 << 24


# --- randomized fuzz (seeded, bounded) -------------------------------------------------------------------------

POOL = [-1, 0, 1, 2, 3, 7, 64, 2**31, 2**63, -(2**63), 10**20, math.nan, math.inf, -math.inf, -0.5, 0.0, 0.5,
        1.0, 1e-300, 1e300, "abc", "", "8", "../x", "a/b", None, True, False, [], {}, [0], [1, 1], {"a": 1}]


def _leaves(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, (*path, i))
    if path:
        yield path


def _set(node, path, value):
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def _mutate_config(rng: random.Random, base: dict) -> dict:
    data = copy.deepcopy(base)
    for _ in range(rng.choice([1, 1, 2])):
        paths = list(_leaves(data))
        path = rng.choice(paths)
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        old = parent[path[-1]]
        roll = rng.random()
        if roll < 0.1 and isinstance(parent, dict):
            del parent[path[-1]]
        elif roll < 0.45 and isinstance(old, (int, float)) and not isinstance(old, bool):
            _set(data, path, rng.choice([old * 1000, -old, old + 1, old - 1, old * 0.5, old * 10**12]))
        else:
            _set(data, path, copy.deepcopy(rng.choice(POOL)))
    return data


class _Traces:
    """Loaded traces by (source, kind, options), so that the fuzz loads each shipped trace once."""

    def __init__(self):
        self.cache = {}

    def get(self, tcfg):
        key = (tcfg.source, tcfg.kind, json.dumps(tcfg.options, sort_keys=True, default=str))
        if key not in self.cache:
            try:
                self.cache[key] = load_trace(tcfg.source, tcfg.kind, name=tcfg.name, **tcfg.options)
            except TraceError as e:
                self.cache[key] = e
        if isinstance(self.cache[key], TraceError):
            raise self.cache[key]
        trace = copy.copy(self.cache[key])
        trace.name = tcfg.name
        return trace


def _first_batches(cfg, traces: _Traces, per_workload: int = 8) -> int:
    """Replay the first batches of every workload (what a dry run does), bounded in count."""
    count = 0
    for workload in cfg.workloads:
        for tcfg in cfg.traces_of(workload):
            trace = traces.get(tcfg)
            batches = (static_batches(trace, workload.static) if workload.static is not None
                       else continuous_batches(trace, workload.continuous))
            count += sum(1 for _ in itertools.islice(batches, per_workload))
    return count


def test_fuzz_config_values(tmp_path):
    """Mutated smoke.yaml values load, or fail with a ConfigError / TraceError naming the file; nothing else,
    and nothing runs long."""
    rng = random.Random(14)
    base = yaml.safe_load(SMOKE)
    traces = _Traces()
    path = tmp_path / "fuzz.yaml"
    outcomes = {"ok": 0, "ConfigError": 0, "TraceError": 0}
    deadline = time.monotonic() + 12
    for i in range(400):
        if time.monotonic() > deadline:
            break
        data = _mutate_config(rng, base)
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        with time_limit(5, f"fuzz config {i}: {data}"):
            try:
                cfg = load_config(path)
                _first_batches(cfg, traces)
                outcomes["ok"] += 1
            except ConfigError as e:
                outcomes["ConfigError"] += 1
                assert str(e).strip(), data
            except TraceError as e:
                outcomes["TraceError"] += 1
                assert str(e).strip(), data
            except Exception as e:  # noqa: BLE001 -- the point of the test
                pytest.fail(f"fuzz config {i}: {type(e).__name__}: {e}\nconfig: {data}")
    assert sum(outcomes.values()) >= 100 and outcomes["ok"] and outcomes["ConfigError"], outcomes


SEED_TRACES = {  # file name -> (bytes, kind)
    "azure.csv": (AZURE.encode() + b"2023-11-16 18:15:52.10,120,7\n2023-11-16 18:15:53.00,88,12\n", "azure"),
    "counts.csv": (b"num_prefill_tokens,num_decode_tokens,num_total_tokens\n74,918,992\n290,905,1195\n12,3,15\n",
                   "sharegpt"),
    "moon.jsonl": ((FIXTURES / "mooncake_sample.jsonl").read_bytes(), "mooncake"),
    "conv.json": ((FIXTURES / "sharegpt_sample.json").read_bytes(), "sharegpt"),
    "conv.jsonl": ("".join(json.dumps(r) + "\n" for r in json.loads((FIXTURES / "sharegpt_sample.json").read_text()))
                   .encode(), "sharegpt"),
}
TOKENS = [b"\x00", b"\xff", b"\xfe", b"\xc3", b"\xef\xbb\xbf", b"NaN", b"Infinity", b"-1", b"0", b"1e400", b"100.7",
          b"12345678901234567890", b'"', b",", b"\n", b"\r", b"[", b"]", b"{", b"}", b"null", b"true", b"[[1]]",
          b"\\u0000", b'"hash_ids"', b'"conversations"', b'"gpt"', b"9" * 30]


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(data) + 1)
        roll = rng.random()
        if roll < 0.25 and data:
            data[min(at, len(data) - 1)] = rng.randrange(256)
        elif roll < 0.55:
            data[at:at] = rng.choice(TOKENS)
        elif roll < 0.7:
            del data[at:at + rng.randint(1, 12)]
        elif roll < 0.8:
            data = data[:at]
        elif roll < 0.9:
            lines = bytes(data).split(b"\n")
            j = rng.randrange(len(lines))
            lines.insert(j, lines[j])
            data = bytearray(b"\n".join(lines))
        else:
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return bytes(data)


def test_fuzz_trace_bytes(tmp_path):
    """Random byte edits of small valid trace files load, or fail with a TraceError naming the file; nothing
    else, and nothing runs long."""
    rng = random.Random(1414)
    outcomes = {"ok": 0, "TraceError": 0, "with line": 0}
    deadline = time.monotonic() + 8
    for i in range(1500):
        if time.monotonic() > deadline:
            break
        name = rng.choice(sorted(SEED_TRACES))
        data, kind = SEED_TRACES[name]
        path = tmp_path / name
        path.write_bytes(_mutate_bytes(rng, data))
        for k in (None, kind):
            with time_limit(5, f"fuzz trace {i} ({name}, kind {k})"):
                try:
                    trace = load_trace(str(path), k)
                    assert len(trace) > 0 and (trace.requests["prompt_len"] > 0).all()
                    outcomes["ok"] += 1
                except TraceError as e:
                    outcomes["TraceError"] += 1
                    assert str(path) in str(e), f"fuzz trace {i}: the message does not name the file: {e}"
                    outcomes["with line"] += bool(re.search(re.escape(str(path)) + r":\d+: ", str(e)))
                except Exception as e:  # noqa: BLE001 -- the point of the test
                    pytest.fail(f"fuzz trace {i} ({name}, kind {k}): {type(e).__name__}: {e}\n"
                                f"bytes: {path.read_bytes()[:400]!r}")
    assert outcomes["ok"] and outcomes["TraceError"] >= 100, outcomes

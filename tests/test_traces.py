"""Trace loaders: the shipped files read right, the formats parse right, bad input fails clearly."""

import csv
import json
import re
import shutil

import numpy as np
import pytest
from conftest import FIXTURES, REPO

from packinfer_bench.errors import TraceError
from packinfer_bench.traces import COLUMNS, detect_kind, load_trace

TRACES = REPO / "traces"


def _csv_column(path, column):
    with open(path, newline="") as f:
        return np.array([int(row[column]) for row in csv.DictReader(f)])


def test_azure_shipped_matches_file():
    prompt = _csv_column(TRACES / "azure_llm_2023_conv.csv", "ContextTokens")
    output = _csv_column(TRACES / "azure_llm_2023_conv.csv", "GeneratedTokens")
    trace = load_trace("azure-conv")
    assert list(trace.requests.columns) == list(COLUMNS)
    assert len(trace) == len(prompt) == 19366
    assert trace.requests["prompt_len"].sum() == prompt.sum()
    assert trace.requests["output_len"].sum() == output.sum()
    assert np.percentile(trace.requests["prompt_len"], 50) == np.percentile(prompt, 50) == 1020
    assert trace.requests["prompt_len"].max() == 14050
    arrivals = trace.requests["arrival_s"].to_numpy()
    assert arrivals[0] == 0 and np.all(np.diff(arrivals) >= 0)
    assert 3400 < arrivals[-1] < 3600  # about 58 minutes
    assert trace.licence == "CC-BY-4.0"


def test_sharegpt_counts_shipped_matches_file():
    path = TRACES / "sharegpt_8k_llama2_tokens.csv"
    prompt = _csv_column(path, "num_prefill_tokens")
    output = _csv_column(path, "num_decode_tokens")
    trace = load_trace("sharegpt")
    assert len(trace) == len(prompt) == 30731
    np.testing.assert_array_equal(trace.requests["prompt_len"], prompt)
    np.testing.assert_array_equal(trace.requests["output_len"], output)
    assert np.median(prompt) == 1730 and prompt.max() == 8141 and output.max() == 1024
    assert "llama-2" in trace.tokenizer and "shipped" in trace.tokenizer
    assert not trace.has_arrivals


def test_mooncake_shipped_matches_file():
    records = [json.loads(line) for line in (TRACES / "mooncake_conversation_trace.jsonl").read_text().splitlines()]
    trace = load_trace("mooncake-conv")
    assert len(trace) == len(records) == 12031
    assert trace.requests["prompt_len"].sum() == sum(r["input_length"] for r in records)
    seen, repeated, total = set(), 0, 0
    for r in records:
        for h in r["hash_ids"]:
            repeated += h in seen
            total += 1
            seen.add(h)
    assert round(repeated / total, 3) == 0.366  # the README's 36.6% of blocks repeat an earlier block
    assert trace.notes["blocks"] == total and trace.notes["distinct_blocks"] == len(seen)
    assert trace.describe()["prefix_sharing_ratio"] > 0.3


def test_mooncake_prefix_groups_from_hash_ids():
    df = load_trace(str(FIXTURES / "mooncake_sample.jsonl")).requests
    assert df["prefix_id"].tolist() == [2, 2, 0, -1]
    assert df["prefix_len"].tolist() == [1100, 1536, 512, 0]  # capped at the prompt; 512-token blocks
    assert df["arrival_s"].tolist() == [0.0, 0.25, 0.5, 1.5]


def test_sharegpt_conversations_fixture():
    def words(text):
        return len(text.split())

    trace = load_trace(str(FIXTURES / "sharegpt_sample.json"), tokenizer=words)
    df = trace.requests
    # conversation 0: (10 words, reply 15), then history 10+15+4 -> (29, 9); conversation 1 single turn (5, 14);
    # conversation 2's reply is empty (skipped); conversation 3 starts with a 3-word system prompt
    assert df["prompt_len"].tolist() == [10, 29, 5, 4, 7, 10]
    assert df["output_len"].tolist() == [15, 9, 14, 1, 1, 1]
    assert df["prefix_id"].tolist() == [0, 0, -1, 3, 3, 3]
    assert df["prefix_len"].tolist() == [10, 10, 0, 4, 7, 7]
    assert trace.notes["skipped_turns"] == 1 and trace.notes["conversations"] == 4
    assert trace.tokenizer == "words"  # a callable tokenizer is recorded by its __name__


def test_sharegpt_conversations_jsonl_and_approximate_tokens(tmp_path):
    records = json.loads((FIXTURES / "sharegpt_sample.json").read_text())
    path = tmp_path / "conv.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    trace = load_trace(str(path))
    assert trace.kind == "sharegpt" and len(trace) == 6
    assert trace.tokenizer.startswith("approximate")
    assert load_trace(str(path), max_conversations=1).requests["prompt_len"].size == 2


def test_sharegpt_hub_id_without_network_is_a_clear_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(TraceError, match="could not load Hugging Face dataset 'someone/sharegpt'.*offline"):
        load_trace("hf:someone/sharegpt")


def test_sharegpt_hub_records_are_parsed(monkeypatch):
    import datasets

    records = json.loads((FIXTURES / "sharegpt_sample.json").read_text())
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: records)
    assert len(load_trace("hf:someone/sharegpt", tokenizer=lambda t: len(t.split()))) == 6


def test_kind_detected_from_content_not_name(tmp_path):
    for src, kind in [("azure_llm_2023_conv.csv", "azure"), ("sharegpt_8k_llama2_tokens.csv", "sharegpt"),
                      ("mooncake_conversation_trace.jsonl", "mooncake")]:
        copy = tmp_path / f"renamed{(TRACES / src).suffix}"
        shutil.copy(TRACES / src, copy)
        assert detect_kind(copy) == kind
    assert load_trace(str(copy), "mooncake").kind == "mooncake"


def test_synthetic_is_seeded_and_follows_its_spec():
    spec = {"num_requests": 500, "prompt": {"dist": "lognormal", "median": 250, "sigma": 1.0, "max": 8192},
            "output": {"dist": "uniform", "low": 10, "high": 20}, "seed": 3, "rate": 5.0}
    a, b = load_trace(None, "synthetic", **spec), load_trace(None, "synthetic", **spec)
    assert a.requests.equals(b.requests)
    assert not a.requests.equals(load_trace(None, "synthetic", **{**spec, "seed": 4}).requests)
    assert a.requests["prompt_len"].max() <= 8192 and a.requests["output_len"].between(10, 20).all()
    assert 150 < np.median(a.requests["prompt_len"]) < 400
    gaps = np.diff(a.requests["arrival_s"])
    assert 0.15 < gaps.mean() < 0.25  # Poisson at 5 requests/s


def test_synthetic_straggler_and_shared_prefix():
    one_long = load_trace(None, "synthetic", num_requests=128,
                          prompt={"dist": "bimodal", "long": 32768, "short": 512, "num_long": 1})
    assert sorted(one_long.requests["prompt_len"].unique()) == [512, 32768]
    assert (one_long.requests["prompt_len"] == 32768).sum() == 1
    shared = load_trace(None, "synthetic", num_requests=64, prompt={"dist": "constant", "value": 200},
                        prefix={"groups": 1, "length": 4096})
    assert (shared.requests["prompt_len"] == 4296).all() and (shared.requests["prefix_len"] == 4096).all()
    assert shared.describe()["prefix_groups"] == 1


# --- bad input -------------------------------------------------------------------------------------------

AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
ROW = "2023-11-16 18:15:46.6805900,374,44\n"


def test_missing_file():
    with pytest.raises(TraceError, match="trace file not found: .*nope.csv"):
        load_trace("nope.csv")


def test_truncated_row_names_file_and_line(write):
    path = write("t.csv", AZURE_HEADER + ROW + ROW + "2023-11-16 18:15:50.99,396\n")
    with pytest.raises(TraceError, match=r"t\.csv:4: expected 3 fields .* got 2"):
        load_trace(str(path))


def test_non_numeric_value_names_file_line_and_column(write):
    path = write("t.csv", AZURE_HEADER + ROW + "2023-11-16 18:15:50.99,lots,10\n")
    with pytest.raises(TraceError, match=r"t\.csv:3: column 'ContextTokens' must be an integer, got 'lots'"):
        load_trace(str(path), "azure")


def test_bad_timestamp(write):
    path = write("t.csv", AZURE_HEADER + ROW + "yesterday,10,10\n")
    with pytest.raises(TraceError, match=r"t\.csv:3: column 'TIMESTAMP' is not a date-time"):
        load_trace(str(path), "azure")


def test_missing_column(write):
    path = write("t.csv", "TIMESTAMP,ContextTokens\n2023-11-16 18:15:46,374\n")
    with pytest.raises(TraceError, match=r"t\.csv:1: missing column\(s\) \['GeneratedTokens'\]"):
        load_trace(str(path), "azure")


@pytest.mark.parametrize("value", ["0", "-5"])
def test_zero_or_negative_length(write, value):
    path = write("t.csv", "num_prefill_tokens,num_decode_tokens\n10,5\n7," + value + "\n")
    with pytest.raises(TraceError, match=r"t\.csv:3: column 'num_decode_tokens' must be > 0"):
        load_trace(str(path))


def test_mooncake_bad_records(write):
    path = write("m.jsonl", '{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [0]}\n'
                            '{"timestamp": 1, "input_length": 10, "output_length": 0, "hash_ids": [0]}\n')
    with pytest.raises(TraceError, match=r"m\.jsonl:2: field 'output_length' must be > 0"):
        load_trace(str(path))
    path = write("m.jsonl", '{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [0]}\n'
                            '{"timestamp": 1, "input_length": 10, "outp')
    with pytest.raises(TraceError, match=r"m\.jsonl:2: not valid JSON"):
        load_trace(str(path), "mooncake")


def test_empty_trace(write):
    with pytest.raises(TraceError, match="empty"):
        load_trace(str(write("t.csv", AZURE_HEADER)), "azure")
    with pytest.raises(TraceError, match="empty file"):
        load_trace(str(write("e.csv", "")), "azure")


def test_unknown_kind_and_unrecognised_format(write):
    with pytest.raises(TraceError, match=r"unknown trace kind 'parquet'; allowed: \['azure', 'mooncake'"):
        load_trace("sharegpt", "parquet")
    with pytest.raises(TraceError, match="format not recognised"):
        load_trace(str(write("x.csv", "a,b\n1,2\n")))


def test_bad_loader_option():
    with pytest.raises(TraceError, match="bad options.*allowed: \\['block_size'\\]"):
        load_trace("mooncake-conv", block_sz=256)


def test_token_counts_cannot_be_retokenized():
    with pytest.raises(TraceError, match="cannot be re-tokenized"):
        load_trace("sharegpt", tokenizer="gpt2")


def test_bad_synthetic_spec():
    with pytest.raises(TraceError, match=r"prompt.dist: unknown distribution 'normal'"):
        load_trace(None, "synthetic", num_requests=4, prompt={"dist": "normal"})
    with pytest.raises(TraceError, match="bimodal takes exactly one of num_long, long_fraction"):
        load_trace(None, "synthetic", num_requests=4, prompt={"dist": "bimodal", "long": 9, "short": 1})


# -- `traces describe`: what a person reads, and whom a trace is credited to ---------------------------------------

def _describe(*args):
    from click.testing import CliRunner

    from packinfer_bench.cli import main

    result = CliRunner().invoke(main, ["traces", "describe", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return dict(line.split(None, 1) for line in result.output.splitlines())


def test_describe_prints_no_python_none_and_counts_as_whole_numbers():
    shown = _describe("sharegpt")  # no arrivals: its time span is missing
    assert shown["time_span_s"] == "-" and shown["rows"] == "30,731"
    assert shown["prompt_len_max"] == "8,141" and shown["prompt_len_p50"] == "1,730"
    for value in shown.values():
        assert value != "None" and not re.search(r"\de[+-]\d", value)


def test_a_users_file_in_a_known_format_is_not_credited_to_the_shipped_trace(tmp_path):
    mine = tmp_path / "my_trace.csv"
    shutil.copy(TRACES / "azure_llm_2023_conv.csv", mine)  # same format, even the same rows: still not ours
    shown = _describe(str(mine))
    assert shown["source"] == "user file (format: azure)" and "Azure" not in shown["licence"]
    assert "CC-BY" not in shown["licence"] and "Patel" not in shown["source"]
    assert "user file" in load_trace(str(FIXTURES / "mooncake_sample.jsonl")).source
    shipped = _describe(str(TRACES / "azure_llm_2023_conv.csv"))  # the shipped file by its path is credited
    assert shipped["licence"] == "CC-BY-4.0" and "AzurePublicDataset" in shipped["source"]


def test_credits_agree_with_the_traces_readme():
    from packinfer_bench.traces import CREDITS, SHIPPED

    rows = {line.split("|")[1].strip(" `"): line for line in (TRACES / "README.md").read_text().splitlines()
            if line.startswith("| `")}
    assert set(CREDITS) == set(SHIPPED) == set(rows)
    for name, (source, licence) in CREDITS.items():
        cells = [c.strip() for c in rows[name].split("|")]
        repository, path, commit = (part.strip(" `") for part in cells[3].split(","))
        assert repository in source and path in source and commit in source, name
        def squeezed(text):
            return re.sub(r"[-\s]", "", text)

        assert squeezed(cells[4]).startswith(squeezed(licence)), name
        assert load_trace(name).licence == licence

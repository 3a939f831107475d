"""Experiment configs: the shipped ones load; bad ones fail with the key, the value and what is allowed."""

import pytest
from conftest import REPO

from packinfer_bench.config import load_config
from packinfer_bench.errors import ConfigError

MINIMAL = """
name: t
traces: [{name: s, source: sharegpt}]
workloads: [{name: w, static: {batch_sizes: [4]}}]
shapes: [{name: x, num_heads: 8, num_kv_heads: 2, head_dim: 128}]
backends: [fa2, packinfer]
"""


@pytest.mark.parametrize("name", ["smoke", "h100", "a100"])
def test_shipped_experiments_load(name):
    cfg = load_config(REPO / "experiments" / f"{name}.yaml")
    assert cfg.name == name and cfg.workloads and cfg.shapes


def test_minimal_config_defaults(write):
    cfg = load_config(write("c.yaml", MINIMAL))
    assert cfg.device == "auto" and cfg.timing.repeats == 50 and cfg.workloads[0].static.batch_sizes == [4]
    assert cfg.workloads[0].static.phases == ["prefill", "decode"]


@pytest.mark.parametrize("edit, message", [
    ("timing: {repeat: 5}", r"timing.repeat: unknown key; allowed keys: \['warmup', 'repeats'"),
    ("timing: {repeats: many}", r"timing.repeats: expected int, got 'many'"),
    ("timing: {flush_l2: 1}", r"timing.flush_l2: expected bool, got 1"),
    ("device: tpu", r"device: 'tpu' not allowed; allowed: \['auto', 'cuda', 'cpu', 'analytic'\]"),
    ("colour: red", r"colour: unknown key"),
])
def test_bad_top_level_keys(write, edit, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write("c.yaml", MINIMAL + edit + "\n"))


@pytest.mark.parametrize("old, new, message", [
    ("backends: [fa2, packinfer]", "backends: [fa9]", r"backends: unknown backend\(s\) \['fa9'\]; allowed: \['fa2'"),
    ("head_dim: 128", "head_dim: 96", r"shapes\[0\].head_dim: 96 not allowed; allowed: \[64, 128, 256\]"),
    ("num_kv_heads: 2", "num_kv_heads: 3",
     r"shapes\[0\].num_heads: 8 must be a positive multiple of num_kv_heads \(3\)"),
    ("{batch_sizes: [4]}", "{batch_sizes: [4], phases: [prefil]}",
     r"workloads\[0\].static.phases\[0\]: unknown phase 'prefil'"),
    ("{batch_sizes: [4]}", "{batch_size: [4]}", r"workloads\[0\].static.batch_size: unknown key; allowed keys"),
    ("{batch_sizes: [4]}", "{batch_sizes: 4}", r"workloads\[0\].static.batch_sizes: expected a list, got 4"),
    ("{name: w, static:", "{name: w, traces: [azure], static:",
     r"workloads\[0\].traces: unknown trace\(s\) \['azure'\]"),
    ("{name: w, static: {batch_sizes: [4]}}", "{name: w}", r"workloads\[0\]: a workload needs exactly one of"),
    ("name: t\n", "", r"name: required key is missing"),
])
def test_bad_nested_values(write, old, new, message):
    assert old in MINIMAL
    with pytest.raises(ConfigError, match=message):
        load_config(write("c.yaml", MINIMAL.replace(old, new)))


def test_unreadable_config(write, tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write("c.yaml", "name: [unclosed\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write("c.yaml", "- just a list\n"))

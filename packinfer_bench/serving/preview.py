"""What an experiment's end-to-end replays will take, before any GPU time is spent (`run --dry-run`): per load
point the schedule's requests, iterations, duration by the step-time model the replays will schedule with, and
peak KV tokens; per entry the replays' total (every backend, every repeat) and the memory of the KV cache the
backends share (the largest: packinfer's grouped cache of the budget). In a resumed folder it also says how many
replays are stored and what is left to run (a replay stored as skipped counts as stored, though a run where its
backend is installed measures it again).

The duration is the schedule's, by a step-time model: the run folder's calibration when one is stored (a resumed
or copied folder schedules with it), else the config's `continuous.step_time`, which a GPU run replaces by
calibrating first. Replays took 0.95-1.44x their modelled time on an H200 and 1.0-1.2x on an H100 (fa2 1.4x: it
falls behind the schedule), plus 15-60 s for each backend's first preparation (graphs, JIT builds;
results/e2e-h100-matrix/e2e/pace.json).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from packinfer_bench.backends import DTYPES
from packinfer_bench.config import ExperimentConfig
from packinfer_bench.models import preset
from packinfer_bench.run_folder.e2e import E2EStore
from packinfer_bench.run_folder.files import E2E_DIR
from packinfer_bench.serving.kv_follow import peak_tokens
from packinfer_bench.serving.replay import kv_bytes, layout_capacity
from packinfer_bench.serving.stage import (
    STEP_TIME_FILE,
    load_point_specs,
    replay_keys,
    scenario,
    server_budget,
    stored_step_time,
)
from packinfer_bench.traces import Trace


def preview_e2e(config: ExperimentConfig, out_dir: Path, traces: dict[str, Trace],
                log: Callable[[str], None]) -> float:
    """Log each e2e entry's load points and totals (module docstring); returns the modelled seconds of the
    replays the folder does not hold yet."""
    path = Path(out_dir) / E2E_DIR / STEP_TIME_FILE
    stored = json.loads(path.read_text()) if path.exists() else {}
    done = E2EStore(out_dir, writer=False).done()
    total = left_total = 0.0
    for e in config.e2e:
        step = stored_step_time(stored, e)
        source = "calibrated, stored" if step is not None else "the config's; a GPU run calibrates first"
        step = step or e.continuous.step_time
        cfg = preset(e.model, e.num_layers)
        log(f"e2e {e.name}: {e.model} x {cfg.num_layers} layers, {len(e.backends)} backend(s) x "
            f"{e.repeats} repeat(s); step time {step.base_ms:.3g} ms + {step.per_token_us:.3g} us/token + "
            f"{step.per_kv_token_ns:.3g} ns/KV token ({source})")
        seconds = left = 0.0
        scenarios = []
        for trace, label, spec in load_point_specs(config, e, step):
            scen = scenario(traces[trace], spec)
            scenarios.append(scen)
            keys = replay_keys(e, trace, label)
            replays, stored_here = len(keys), sum(key in done for key in keys)
            seconds += scen.modelled_s * replays
            left += scen.modelled_s * (replays - stored_here)
            log(f"  {trace} load {label}: {len(scen.arrivals)} requests ({scen.refused} refused), "
                f"{len(scen.schedule)} iterations, {scen.modelled_s:.1f} s modelled, peak "
                f"{peak_tokens(scen.schedule)} KV tokens" + (f"; {stored_here} of {replays} replays stored"
                                                              if stored_here else ""))
        budget, seqs = server_budget(e.continuous, scenarios)
        grouped = layout_capacity("grouped", 0, budget, seqs)
        gib = kv_bytes(grouped, cfg, DTYPES[e.dtype]) / 2**30
        log(f"  all replays: {seconds / 60:.1f} minutes modelled ({left / 60:.1f} left); KV cache shared by the "
            f"backends ~{gib:.1f} GiB ({grouped} tokens, the grouped layout's room for a {budget}-token budget)")
        total, left_total = total + seconds, left_total + left
    log(f"e2e: {total / 60:.1f} minutes of modelled replays in all, {left_total / 60:.1f} left to run")
    return left_total

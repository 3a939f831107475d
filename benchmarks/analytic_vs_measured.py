"""How well does analytic mode predict? For every batch of a measured run that packinfer ran through its packed
varlen kernel (prefill, append and mixed batches), the analytic model's predicted speedup of the packinfer
plan over FlashAttention-2's grid beside the measured speedup of packinfer:full over triton_unpacked:fa2-grid
(the same kernel on FA2's grid: the model's exact question) and over fa2:varlen. Prints Pearson and Spearman
correlations; writes analytic_vs_measured.csv and .json to --out.

    python benchmarks/analytic_vs_measured.py results/sweep-h100 --sms 132 --out results/sweep-h100
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from packinfer_bench.analytic import predict
from packinfer_bench.backends.packinfer import DECODE_MAX_Q
from packinfer_bench.config import load_config
from packinfer_bench.experiment import read_batches
from packinfer_bench.run_folder import RECORDS_FILE


def compare(run: Path, sms: int) -> pd.DataFrame:
    """One row per measured varlen-path batch and shape: predicted and measured speedups."""
    shapes = {s.name: s for s in load_config(run / "config.yaml").shapes}
    rec = pd.read_csv(run / RECORDS_FILE)
    ok = rec[rec.status == "ok"].set_index(["batch_id", "shape", "backend", "variant"])["kernel_ms"]
    rows = []
    for batch in read_batches(run):
        if int(batch.q_lens.max()) <= DECODE_MAX_Q:
            continue  # decode batches run cache attention, which the model does not describe
        for name, shape in shapes.items():
            key = (batch.batch_id, name)
            ours = ok.get((*key, "packinfer", "full"))
            if ours is None:
                continue
            pred = predict(batch, shape, sms)
            rows.append({"batch_id": batch.batch_id, "shape": name, "phase": batch.phase,
                         "kv_len_cv": batch.stats()["kv_len_cv"], "predicted_speedup": pred["predicted_speedup"],
                         "fa2_grid_imbalance": pred["fa2_grid_imbalance"],
                         "packinfer_imbalance": pred["packinfer_imbalance"],
                         "measured_vs_fa2_grid": ok.get((*key, "triton_unpacked", "fa2-grid"), float("nan")) / ours,
                         "measured_vs_fa2": ok.get((*key, "fa2", "varlen"), float("nan")) / ours})
    return pd.DataFrame(rows)


def correlations(df: pd.DataFrame) -> dict[str, dict[str, float]]:
    out = {}
    for col in ("measured_vs_fa2_grid", "measured_vs_fa2"):
        pair = df[["predicted_speedup", col]].dropna()
        out[col] = {"batches": len(pair),
                    "pearson": float(pair.corr(method="pearson").iloc[0, 1]) if len(pair) > 2 else float("nan"),
                    "spearman": float(pair.corr(method="spearman").iloc[0, 1]) if len(pair) > 2 else float("nan")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a run folder with config.yaml, batches.jsonl and records.csv")
    ap.add_argument("--sms", type=int, default=132, help="SMs of the GPU the run measured (H100 SXM: 132)")
    ap.add_argument("--out", type=Path, help="folder for analytic_vs_measured.csv/.json (default: the run)")
    args = ap.parse_args()
    out = args.out or args.run
    out.mkdir(parents=True, exist_ok=True)
    df = compare(args.run, args.sms)
    corr = {"all": correlations(df), **{phase: correlations(g) for phase, g in df.groupby("phase")}}
    df.to_csv(out / "analytic_vs_measured.csv", index=False)
    (out / "analytic_vs_measured.json").write_text(json.dumps({"sms": args.sms, **corr}, indent=2) + "\n")
    print(df.groupby("phase")[["predicted_speedup", "measured_vs_fa2_grid", "measured_vs_fa2"]].describe()
          .T.round(3).to_string())
    for group, cols in corr.items():
        for col, c in cols.items():
            print(f"{group:<8} predicted vs {col}: {c['batches']} batches, Pearson {c['pearson']:.3f}, "
                  f"Spearman {c['spearman']:.3f}")


if __name__ == "__main__":
    main()

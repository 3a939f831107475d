"""Workload replay: traces become the exact sequence of attention batches the kernels will see."""

from packinfer_bench.workload.batch import BATCH_PHASES, REQUEST_PHASES, Batch
from packinfer_bench.workload.continuous import ContinuousSpec, StepTime, continuous_batches
from packinfer_bench.workload.static import StaticSpec, static_batches

__all__ = ["BATCH_PHASES", "REQUEST_PHASES", "Batch", "ContinuousSpec", "StaticSpec", "StepTime",
           "continuous_batches", "static_batches"]

"""packinfer-bench: trace-driven benchmarking of packed attention kernels against FlashAttention-style baselines.

Data flows one way: traces -> workload (batches) -> backends -> records -> report.
"""

__version__ = "0.1.0"

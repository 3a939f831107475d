"""packinfer-bench: trace-driven benchmarking of packed attention kernels against FlashAttention-style baselines.

Data flows one way: traces -> workload (batches) -> backends -> records -> report.
"""

from importlib.metadata import PackageNotFoundError, version

try:  # the one version source is kernels/packinfer/__init__.py; pyproject.toml puts it in this package's metadata
    __version__ = version("packinfer-bench")
except PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "unknown"

"""packinfer: packed attention for batches of requests with very different lengths (PackInfer).

The kernel library stands alone: it never imports the benchmark harness (packinfer_bench), so a serving stack
can take it by itself.
"""

__version__ = "0.1.0"

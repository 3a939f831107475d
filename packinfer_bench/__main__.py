"""`python -m packinfer_bench`: the packinfer-bench command line."""

from packinfer_bench.cli import main

main()

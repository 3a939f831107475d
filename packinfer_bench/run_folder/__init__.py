"""A run folder: its file names, the records and end-to-end rows it stores, and the one append-only store that
writes them and resumes from them."""

from packinfer_bench.run_folder.files import (
    ANALYTIC_FILE,
    BATCHES_FILE,
    CONFIG_FILE,
    E2E_DIR,
    ENV_FILE,
    ITERATIONS_FILE,
    RECORDS_FILE,
    REQUESTS_FILE,
    SUMMARY_FILE,
    TRACES_FILE,
    WORKLOAD_FILE,
)
from packinfer_bench.run_folder.folder import RunFolder, new_run_path, open_run_folder
from packinfer_bench.run_folder.store import BadLines, CsvRows, JsonLines, write_atomic

__all__ = ["ANALYTIC_FILE", "BATCHES_FILE", "CONFIG_FILE", "E2E_DIR", "ENV_FILE", "ITERATIONS_FILE", "RECORDS_FILE",
           "REQUESTS_FILE", "SUMMARY_FILE", "TRACES_FILE", "WORKLOAD_FILE", "BadLines", "CsvRows", "JsonLines",
           "RunFolder", "new_run_path", "open_run_folder", "write_atomic"]

"""The names of the files in a run folder (results/<experiment>/<run-id>/), defined once."""

CONFIG_FILE = "config.yaml"
ENV_FILE = "env.json"
TRACES_FILE = "traces.json"
BATCHES_FILE = "batches.jsonl"
WORKLOAD_FILE = "workload.csv"
RECORDS_FILE = "records.csv"
ANALYTIC_FILE = "analytic.csv"
E2E_DIR = "e2e"
SUMMARY_FILE, REQUESTS_FILE, ITERATIONS_FILE = "summary.csv", "requests.csv", "iterations.csv"
#: One JSON line per session that opened the run folder: when, with which config hash, on what environment.
SESSIONS_FILE = "sessions.jsonl"
#: Work of a run spread over several processes while it runs: the ranks' job files and record parts (merged into
#: records.csv, then removed; a part left by a killed run is merged when the folder is resumed).
DIST_DIR = "dist"

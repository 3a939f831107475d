"""End-to-end serving replay: a model-shaped decoder whose attention is each backend's, driven by the
continuous-batching schedule, measured per iteration and per request (TTFT, TPOT, end-to-end latency)."""

"""Adapters that plug packinfer into serving stacks written elsewhere; each imports its stack lazily, so
`import packinfer` never needs them. `packinfer.integrations.transformers`: Hugging Face continuous batching."""

"""The learner role of archer-async (imports only archer_async).

- `trainer`: `Learner`, one FSDP2 rank: training step, weight broadcast, checkpoints, HF export.
- `model`: model loading, attention selection, FSDP2 wrapping, activation checkpointing.
- `batching`: groups -> rows -> token-balanced rank shards -> padded micro-batches.
- `weights`: bucketed full-weight gathering with Hugging Face names (collective generator).
- `checkpoint`: atomic DCP checkpoints (`step-N/`, DONE marker, `latest` pointer).
- `export`: `hf/step-N/` export loadable by transformers and vLLM.
- `distributed`: process-group set-up and small object collectives.
"""

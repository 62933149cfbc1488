"""vLLM plugin entry point: registers the project's weight-transfer engine as backend "archer".

vLLM runs every `vllm.general_plugins` entry point in each engine and worker process
(pyproject.toml: `archer_async_weight_transfer = "actors.vllm_plugin:register"`), so the engine
(`actors.vllm_weight_engine.ArcherWeightTransferEngine`) is known wherever vLLM's
`WeightTransferEngineFactory.create_engine` runs; the factory imports it by module path when an
engine asks for the backend.
"""

from __future__ import annotations

BACKEND_NAME = "archer"
ENGINE_MODULE = "actors.vllm_weight_engine"


def register() -> None:
    """Entry point of `vllm.general_plugins`: register the engine (idempotent)."""
    from vllm.distributed.weight_transfer import WeightTransferEngineFactory

    if BACKEND_NAME not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND_NAME, ENGINE_MODULE, "ArcherWeightTransferEngine")

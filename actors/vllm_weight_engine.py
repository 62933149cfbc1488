"""The project's weight-transfer engine inside vLLM, registered as backend "archer" (`actors.vllm_plugin`).

An engine is created with

    AsyncEngineArgs(..., weight_transfer_config={"backend": "archer"})

and driven through vLLM's own API, one control call per update:

    await llm.init_weight_transfer_engine(WeightTransferInitRequest(init_info=sync_init.for_rank(r).to_dict()))
    await llm.start_weight_update()
    await llm.update_weights(WeightTransferUpdateRequest(update_info={"version": v}))
    await llm.finish_weight_update(weight_version=str(v))

The data plane is `archer_async.weight_sync` (gloo on CPU, NCCL on GPU), received by
`actors.weight_receiver.WeightReceiver`. With `staged` (default) the worker receives the whole update
into a staging copy (host memory on a GPU, outside vLLM's GPU memory budget) before touching the model, so a failed or late transfer leaves the previous
weights serving; only then is it loaded through vLLM's layerwise reload (`initialize_layerwise_reload`
... `finalize_layerwise_reload`), which is what makes loading into a running engine work on CPU,
where linear weights are repacked after the first load.

vLLM imports this module by name in its worker processes (the factory registration names it); it
imports vLLM at the top and is imported nowhere else.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Optional

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase
from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

from actors import reload_log
from actors.weight_receiver import WeightReceiver
from archer_async.weight_sync import SyncInit

log = logging.getLogger(__name__)


def refresh_tied_layers(model: torch.nn.Module) -> int:
    """Re-run weight post-processing of unquantized layers that share their weight with another layer.

    A layerwise reload processes the layer that received a weight; a layer tied to it (the tied
    `lm_head` of a model with `tie_word_embeddings`) sees the new values in the shared parameter but,
    on CPU, keeps the GEMM kernel it packed from the old values (`dispatch_cpu_unquantized_gemm`).
    Returns the number of layers refreshed (0 on GPU too, where the post-processing is a no-op).
    """
    by_storage: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        w = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        qm = getattr(module, "quant_method", None)
        if w is None or w.numel() == 0 or not isinstance(qm, QuantizeMethodBase):
            continue
        if not type(qm).__name__.startswith("Unquantized"):
            continue
        by_storage.setdefault(w.data_ptr(), []).append(module)
    n = 0
    for modules in by_storage.values():
        if len(modules) > 1:
            for module in modules:
                module.quant_method.process_weights_after_loading(module)
                n += 1
    return n


@dataclasses.dataclass
class ArcherInitInfo(WeightTransferInitInfo):
    """`SyncInit.to_dict()` of this actor (rank = its first worker's rank) plus the staging flag."""

    host: str
    store_port: int
    world_size: int
    backend: str = "gloo"
    timeout_s: float = 120.0
    rank: int = 1
    staged: bool = True
    token: str = ""


@dataclasses.dataclass
class ArcherUpdateInfo(WeightTransferUpdateInfo):
    """One update: the version the sender must announce, and an optional tighter deadline."""

    version: int
    timeout_s: Optional[float] = None


class ArcherWeightTransferEngine(WeightTransferEngine[ArcherInitInfo, ArcherUpdateInfo]):
    """Receives `archer_async.weight_sync` updates and loads them into the worker's model."""

    init_info_cls = ArcherInitInfo
    update_info_cls = ArcherUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.receiver = None
        self.staged = True
        self.last_stats: dict[str, Any] = {}

    def init_transfer_engine(self, init_info: ArcherInitInfo) -> None:
        pc = self.parallel_config
        # Workers of one actor (tensor/pipeline parallel) take consecutive ranks after its first.
        worker = pc.data_parallel_index * pc.world_size + pc.rank
        info = SyncInit(host=init_info.host, store_port=init_info.store_port, world_size=init_info.world_size,
                        backend=init_info.backend, timeout_s=init_info.timeout_s, rank=init_info.rank + worker,
                        token=init_info.token)
        self.staged = bool(init_info.staged)
        # nccl: the communicator is built by the first update (every member joins it then, concurrently),
        # and rebuilt when the membership changes; here only the control store is reached.
        device = self.device if info.backend == "nccl" else torch.device("cpu")
        self.receiver = WeightReceiver(info, device=device)
        self.receiver.connect()
        # vLLM's reload warns "Failed to load weights" for tied and buffer-only layers on every update
        # of a healthy run; those lines only (actors/reload_log.py says why they are harmless) are dropped.
        reload_log.install(self.model)

    def start_weight_update(self) -> None:
        if self.receiver is None:
            raise RuntimeError("archer weight transfer: init_weight_transfer_engine was not called")

    def receive_weights(self, update_info: ArcherUpdateInfo) -> None:
        t0 = time.monotonic()
        gpu = self.receiver.device.type != "cpu"
        stream = self.receiver.receive(update_info.version, timeout_s=update_info.timeout_s, to_host=self.staged and gpu)
        if self.staged:
            # the whole update, before the model is touched (in host memory on a GPU: the GPU holds one
            # bucket beyond the model while receiving, and one tensor while loading)
            weights = list(stream)
            t1 = time.monotonic()
            initialize_layerwise_reload(self.model)
            dev = self.receiver.device
            self.model.load_weights(((n, t.to(dev)) for n, t in weights) if gpu else weights)
            finalize_layerwise_reload(self.model, self.model_config)
            refresh_tied_layers(self.model)
            del weights
        else:
            t1 = t0
            initialize_layerwise_reload(self.model)
            try:
                self.model.load_weights(stream)
            finally:
                stream.close()  # a loader that stopped early is reported to the sender with the next request
                finalize_layerwise_reload(self.model, self.model_config)
                refresh_tied_layers(self.model)
        t2 = time.monotonic()
        self.last_stats = dict(self.receiver.last_stats, receive_s=t1 - t0, load_s=t2 - t1)
        log.info("archer weight transfer: loaded version %s (%.1f MB) in %.2f s",
                 update_info.version, self.last_stats.get("bytes", 0) / 1e6, t2 - t0)

    def finish_weight_update(self) -> None:
        pass

    def shutdown(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
            self.receiver = None

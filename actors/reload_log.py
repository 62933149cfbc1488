"""Which of vLLM's "<Layer>: Failed to load weights" warnings a weight update makes for a good reason.

vLLM's layerwise reload (`vllm.model_executor.model_loader.reload.layerwise`) warns
"%s: Failed to load weights" for every layer that received no tensor in an update and puts that
layer's previous tensors back. Two kinds of layer never receive one, on every update of a healthy run:

- a layer whose every parameter is tied to (shares its storage with) another layer's, e.g. the
  `lm_head` of a model with `tie_word_embeddings`: a checkpoint has the tensor once, under the other
  layer's name, which loads it (and `refresh_tied_layers` re-packs the tied layer's kernel);
- a layer without parameters, only buffers computed from the config (e.g. the rotary embedding's
  cos/sin cache): no checkpoint has them, and putting them back is exactly right.

`TiedOrBufferOnlyFilter` drops the warning for those layer classes only (computed from the model
before the first update); a layer with a real parameter that an update did not carry still warns.
The test that the weights did change is tests/integration/test_actors_vllm.py (log-probs after an
update equal the sender's weights', per token and version).
"""

from __future__ import annotations

import logging

import torch

VLLM_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"
FAILED_MSG = "%s: Failed to load weights"


def expected_unloaded_layers(model: torch.nn.Module) -> frozenset[str]:
    """Class names of the layers that never receive a tensor in an update (see the module docstring).

    A class is listed only when every instance of it is tied or buffer-only, so an untied instance
    of the same class that failed to load is still reported.
    """
    first_owner: dict[int, torch.nn.Module] = {}  # storage -> the first layer holding it (the one that loads it)
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None and p.numel() > 0:
                first_owner.setdefault(p.data_ptr(), module)
    ok: set[str] = set()
    not_ok: set[str] = set()
    for module in model.modules():
        params = [p for p in module._parameters.values() if p is not None and p.numel() > 0]
        buffers = [b for b in module._buffers.values() if b is not None]
        if not params and not buffers:
            continue
        name = type(module).__name__
        if all(first_owner[p.data_ptr()] is not module for p in params):
            ok.add(name)  # buffer-only, or every parameter tied to an earlier layer's
        else:
            not_ok.add(name)
    return frozenset(ok - not_ok)


class TiedOrBufferOnlyFilter(logging.Filter):
    """Drops "<Layer>: Failed to load weights" records of the given layer classes; passes the rest."""

    def __init__(self, layer_classes: frozenset[str]):
        super().__init__()
        self.layer_classes = layer_classes

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == FAILED_MSG and record.args and record.args[0] in self.layer_classes:
            return False
        return True


def install(model: torch.nn.Module) -> TiedOrBufferOnlyFilter:
    """Attach the filter for `model` to vLLM's reload logger (once per process; replaces an earlier one)."""
    logger = logging.getLogger(VLLM_RELOAD_LOGGER)
    for f in list(logger.filters):
        if isinstance(f, TiedOrBufferOnlyFilter):
            logger.removeFilter(f)
    f = TiedOrBufferOnlyFilter(expected_unloaded_layers(model))
    logger.addFilter(f)
    return f

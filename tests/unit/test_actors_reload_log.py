"""vLLM's "Failed to load weights" warning is dropped only for tied and buffer-only layer classes."""

from __future__ import annotations

import logging

import torch

from actors import reload_log


class Rotary(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("cos_sin_cache", torch.ones(4, 2), persistent=False)


class Head(torch.nn.Module):
    def __init__(self, weight: torch.nn.Parameter):
        super().__init__()
        self.weight = weight


class Tiny(torch.nn.Module):
    def __init__(self, tied: bool):
        super().__init__()
        self.embed = torch.nn.Embedding(8, 4)
        self.rotary = Rotary()
        self.proj = torch.nn.Linear(4, 4)
        self.lm_head = Head(self.embed.weight if tied else torch.nn.Parameter(torch.zeros(8, 4)))


def _emitted(model: torch.nn.Module, layer_classes: list[str]) -> list[str]:
    logger = logging.getLogger(reload_log.VLLM_RELOAD_LOGGER)
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    h = Keep()
    logger.addHandler(h)
    f = reload_log.install(model)
    try:
        for name in layer_classes:
            logger.warning(reload_log.FAILED_MSG, name)
        logger.warning("%s: Delayed processing", "Rotary")
    finally:
        logger.removeHandler(h)
        logger.removeFilter(f)
    return seen


def test_tied_head_and_buffer_only_layers_are_expected():
    assert reload_log.expected_unloaded_layers(Tiny(tied=True)) == {"Rotary", "Head"}
    assert reload_log.expected_unloaded_layers(Tiny(tied=False)) == {"Rotary"}


def test_filter_drops_exactly_the_expected_failed_lines():
    out = _emitted(Tiny(tied=True), ["Rotary", "Head", "Linear", "Embedding"])
    assert out == ["Linear: Failed to load weights", "Embedding: Failed to load weights",
                   "Rotary: Delayed processing"]
    # an untied head that got no tensor is a real failure and is still reported
    out = _emitted(Tiny(tied=False), ["Head"])
    assert out == ["Head: Failed to load weights", "Rotary: Delayed processing"]


def test_install_replaces_an_earlier_filter():
    logger = logging.getLogger(reload_log.VLLM_RELOAD_LOGGER)
    reload_log.install(Tiny(tied=True))
    f = reload_log.install(Tiny(tied=False))
    try:
        assert [x for x in logger.filters if isinstance(x, reload_log.TiedOrBufferOnlyFilter)] == [f]
    finally:
        logger.removeFilter(f)

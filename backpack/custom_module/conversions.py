"""Registry of module conversions the converter (``extend(..., use_converter=True)``) applies
before tracing: a composite torch module whose ``forward`` cannot be traced or mixes functional
calls (e.g. ``nn.TransformerEncoderLayer``) is replaced by an equivalent built from modules with
rules, sharing the original's parameters."""

from __future__ import annotations

from collections.abc import Callable

from torch.nn import Module

CONVERSIONS: dict[type, Callable[[Module], Module]] = {}


def register_conversion(*module_types: type) -> Callable:
    """Decorator: ``fn(module) -> equivalent module`` is used for exactly these types."""

    def deco(fn: Callable[[Module], Module]) -> Callable[[Module], Module]:
        for t in module_types:
            CONVERSIONS[t] = fn
        return fn

    return deco

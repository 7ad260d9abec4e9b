"""``ScaleModule``: multiplication by a constant (``x * c``, ``x / c``, ``-x``) as a module."""

from __future__ import annotations

from torch import Tensor, nn


class ScaleModule(nn.Module):
    """``weight * input`` for a constant float ``weight``."""

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = weight

    def forward(self, input: Tensor) -> Tensor:
        return input * self.weight

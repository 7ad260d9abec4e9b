"""``Reshape`` (batch axis kept) and ``Concat`` (several inputs): what the converter inserts
for ``view``/``reshape`` and ``torch.cat``."""

from __future__ import annotations

from torch import Tensor, cat, nn


class Reshape(nn.Module):
    """``input.reshape(n, *shape)``: a reshape within each sample."""

    def __init__(self, *shape: int):
        super().__init__()
        self.shape = shape

    def forward(self, input: Tensor) -> Tensor:
        return input.reshape(input.shape[0], *self.shape)


class Concat(nn.Module):
    """``torch.cat(tensors, dim)`` along a non-batch axis."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, *tensors: Tensor) -> Tensor:
        return cat(tensors, self.dim)

"""``PositionalEmbedding``: learned absolute positions added to a sequence of embeddings."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class PositionalEmbedding(nn.Module):
    """``x + weight[:L]`` for ``x`` ``[n, L, *feat]``, ``weight`` ``[num_positions, *feat]``
    (``L <= num_positions``), as in ViT and GPT."""

    def __init__(self, num_positions: int, *feat: int, std: float = 0.02):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_positions, *feat) * std)

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() < 2 or input.shape[1] > self.weight.shape[0]:
            raise ValueError(
                f"PositionalEmbedding: input {tuple(input.shape)} needs a batch axis and at "
                f"most {self.weight.shape[0]} positions on axis 1."
            )
        return input + self.weight[: input.shape[1]]

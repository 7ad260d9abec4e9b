"""``SumModule``: the sum of several tensors (residual additions as a module)."""

from __future__ import annotations

from torch import Tensor, nn


class SumModule(nn.Module):
    """``x_1 + ... + x_k`` for tensors of one shape."""

    def forward(self, *tensors: Tensor) -> Tensor:
        if not tensors or any(t.shape != tensors[0].shape for t in tensors):
            raise ValueError(
                f"SumModule expects tensors of one shape, got {[tuple(t.shape) for t in tensors]}."
            )
        out = tensors[0]
        for t in tensors[1:]:
            out = out + t
        return out

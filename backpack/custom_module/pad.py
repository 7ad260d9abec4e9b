"""``Pad``: ``F.pad`` as a module (constant mode is linear in the input)."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F


class Pad(nn.Module):
    """``F.pad(input, pad, mode, value)``."""

    def __init__(self, pad: tuple[int, ...], mode: str = "constant", value: float | None = None):
        super().__init__()
        self.pad, self.mode, self.value = tuple(pad), mode, value

    def forward(self, input: Tensor) -> Tensor:
        return F.pad(input, self.pad, self.mode, self.value)

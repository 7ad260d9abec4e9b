"""``Slicing``: ``input[slice_info]`` as a module; the batch axis must be kept whole."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


class Slicing(nn.Module):
    """``input[slice_info]`` with ``slice_info[0] == slice(None)`` (every sample kept).

    Raises:
        ValueError: if the index touches the batch axis.
    """

    def __init__(self, slice_info: tuple[Any, ...]):
        super().__init__()
        if not slice_info or slice_info[0] != slice(None):
            raise ValueError(f"Slicing: the batch axis must be kept whole, got {slice_info}.")
        self.slice_info = slice_info

    def forward(self, input: Tensor) -> Tensor:
        return input[self.slice_info]

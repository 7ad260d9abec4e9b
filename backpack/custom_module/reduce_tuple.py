"""``ReduceTuple``: pick one element of a tuple output (e.g. after ``nn.LSTM``)."""

from __future__ import annotations

from typing import Any

from torch import nn


class ReduceTuple(nn.Module):
    """``input[index]``; used inside ``nn.Sequential`` after modules that return tuples."""

    def __init__(self, index: int = 0):
        super().__init__()
        self.index = index

    def forward(self, input: tuple) -> Any:
        return input[self.index]

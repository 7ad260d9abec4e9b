"""Branching as modules: ``Parallel`` feeds one input to several branches and merges their
outputs (``SumModule`` by default); ``_Branch`` returns the branch outputs as a tuple.
Neither is hooked by ``extend`` (containers); the merge module is."""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn


class SumModule(nn.Module):
    """``x_1 + ... + x_k`` for tensors of one shape."""

    def forward(self, *tensors: Tensor) -> Tensor:
        """Elementwise sum of ``tensors`` (all of one shape)."""
        if not tensors or any(t.shape != tensors[0].shape for t in tensors):
            raise ValueError(
                f"SumModule expects tensors of one shape, got {[tuple(t.shape) for t in tensors]}."
            )
        out = tensors[0]
        for t in tensors[1:]:
            out = out + t
        return out


class _Branch(nn.Module):
    """``x -> (m_1(x), ..., m_k(x))``; modules given in order or as one ``OrderedDict``."""

    def __init__(self, *modules: nn.Module | OrderedDict):
        super().__init__()
        if len(modules) == 1 and isinstance(modules[0], OrderedDict):
            for name, m in modules[0].items():
                self.add_module(name, m)
        else:
            for i, m in enumerate(modules):
                self.add_module(str(i), m)

    def forward(self, x: Tensor) -> tuple:
        return tuple(m(x) for m in self.children())


class Parallel(nn.Sequential):
    """``merge(m_1(x), ..., m_k(x))``, ``merge`` a ``SumModule`` unless given; submodules
    ``0`` (the ``_Branch``) and ``1`` (the merge module), as in BackPACK 1.7."""

    def __init__(self, *modules: nn.Module | OrderedDict, merge_module: nn.Module | None = None):
        super().__init__(_Branch(*modules), SumModule() if merge_module is None else merge_module)

    def forward(self, x: Tensor) -> Tensor:
        """The merge module applied to the outputs of the branches."""
        return self[1](*self[0](x))

"""Rules of the modules in ``backpack.custom_module`` (what the converter inserts)."""

from __future__ import annotations

from torch import Tensor
from torch.nn import Module

from backpack.custom_module.branching import SumModule
from backpack.derivatives.base import IO, Rule, register


@register(SumModule)
class SumRule(Rule):
    """``out = sum_i x_i``: every input receives ``mat`` unchanged."""

    needs_output = False

    def jac_t_mat_prod(self, module: Module, io: IO, mat: Tensor) -> tuple[Tensor, ...]:
        return tuple(mat for _ in io.inputs)

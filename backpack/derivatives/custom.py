"""Rules of the modules in ``backpack.custom_module`` (what the converter inserts)."""

from __future__ import annotations

from torch import Tensor
from torch.nn import Module

from backpack.custom_module.branching import SumModule
from backpack.custom_module.pad import Pad
from backpack.custom_module.scale_module import ScaleModule
from backpack.custom_module.shape import Concat, Reshape
from backpack.custom_module.slicing import Slicing
from backpack.derivatives.base import IO, Request, Rule
from backpack.derivatives.shape_ops import LinearOpRule, ReshapeRule
from backpack.registry import register


@register(SumModule)
class SumRule(Rule):
    """``out = sum_i x_i``: every input receives ``mat`` unchanged."""

    needs_output = False
    inplace_needs_input = False  # reads no input (an in-place ``a += b`` needs no copy)

    def jac_t_mat_prod(self, module: Module, io: IO, mat: Tensor) -> tuple[Tensor, ...]:
        return tuple(mat for _ in io.inputs)


@register(ScaleModule)
class ScaleRule(LinearOpRule):
    """``out = c x``: ``J^T mat = c mat``."""

    def jac_t_mat_prod(self, module: ScaleModule, io: IO, mat: Tensor) -> Tensor:
        return mat * module.weight


@register(Reshape)
class ReshapeModuleRule(ReshapeRule):
    """``Reshape``: a reshape within each sample."""


@register(Slicing, Pad)
class SliceOrPadRule(LinearOpRule):
    """``input[slice_info]`` / constant ``F.pad``: linear ops, ``J^T`` by vjp at zero."""

    def check(self, module: Module, io: IO, request: Request | None) -> None:
        if isinstance(module, Pad) and module.mode != "constant":
            raise NotImplementedError(
                f"{module}: only mode='constant' padding is supported ({request.name}); "
                "use nn.ReflectionPad/nn.ReplicationPad modules for other modes."
            )


@register(Concat)
class ConcatRule(Rule):
    """``out = cat(x_1, ..., x_k)``: input ``i`` receives its slice of ``mat`` [v, n, *out]."""

    needs_output = False

    def jac_t_mat_prod(self, module: Concat, io: IO, mat: Tensor) -> tuple[Tensor, ...]:
        dim = module.dim % io.inputs[0].dim() + 1  # +1: the vector axis in front
        return mat.split([x.shape[dim - 1] for x in io.inputs], dim)

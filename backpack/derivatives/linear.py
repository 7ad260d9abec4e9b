"""``nn.Linear``: ``out[n, s, o] = sum_i W[o, i] x[n, s, i] + b[o]`` over extra input dims ``s``."""

from __future__ import annotations

from torch import Tensor, nn

from backpack.derivatives.base import IO
from backpack.derivatives.linear_form import LinearFormRule
from backpack.registry import register


@register(nn.Linear)
class LinearRule(LinearFormRule):
    """Jacobian products of ``nn.Linear`` (inputs ``[n, *, i]``)."""

    def jac_t_mat_prod(self, module: nn.Linear, io: IO, mat: Tensor) -> Tensor:
        """``[v, n, *, o] -> [v, n, *, i]``: ``mat W``."""
        return mat @ module.weight

    def jac_mat_prod(self, module: nn.Linear, io: IO, mat: Tensor) -> Tensor:
        """``[v, n, *, i] -> [v, n, *, o]``: ``mat W^T``."""
        return mat @ module.weight.T

    def factors(self, module: nn.Linear, io: IO, mat: Tensor) -> tuple[Tensor, Tensor]:
        """``a = x`` as ``[1, n, 1, i, s]``, ``b = mat`` as ``[v, n, 1, o, s]``."""
        x = io.input0
        a = x.reshape(1, x.shape[0], 1, -1, x.shape[-1]).transpose(-1, -2)
        b = mat.reshape(mat.shape[0], mat.shape[1], 1, -1, mat.shape[-1]).transpose(-1, -2)
        return a, b

    def bias_jac_t(self, module: nn.Linear, mat: Tensor) -> Tensor:
        """``[v, n, *, o] -> [v, n, o]``."""
        return mat.reshape(mat.shape[0], mat.shape[1], -1, mat.shape[-1]).sum(2)

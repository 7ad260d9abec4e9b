"""``nn.Linear``: ``out[n, s, o] = sum_i W[o, i] x[n, s, i] + b[o]`` over extra input dims ``s``."""

from __future__ import annotations

from torch import Tensor, nn

from backpack.derivatives.base import IO
from backpack.derivatives.linear_form import LinearFormRule
from backpack.registry import register, register_by_name


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


@register_by_name("transformers.pytorch_utils.Conv1D")
class TransposedLinearRule(LinearRule):
    """Hugging Face's ``Conv1D`` (GPT-2): ``out = x W + b`` with ``W [i, o]``, a Linear layer
    whose weight is stored transposed. The weight's vjp ``sum_s x g^T`` is ``[i, o]``: the
    linear-form factors swap sides; Kronecker factors are ``[A, G]`` (rows on the input side).
    """

    kron_input_rows = True

    def jac_t_mat_prod(self, module: nn.Module, io: IO, mat: Tensor) -> Tensor:
        """``[v, n, *, o] -> [v, n, *, i]``: ``mat W^T``."""
        return mat @ module.weight.T

    def jac_mat_prod(self, module: nn.Module, io: IO, mat: Tensor) -> Tensor:
        """``[v, n, *, i] -> [v, n, *, o]``: ``mat W``."""
        return mat @ module.weight

    def factors(self, module: nn.Module, io: IO, mat: Tensor) -> tuple[Tensor, Tensor]:
        """Linear's factors with the sides swapped (``sum_s b a^T`` is ``[i, o]``)."""
        a, b = super().factors(module, io, mat)
        return b, a

    def kron_factors(self, module: nn.Module, io: IO, mat: Tensor, name: str) -> list | None:
        """The weight's block in the Linear layout ``(a = x, b = mat)``; the bias: None."""
        if name != "weight":
            return None
        return [super().factors(module, io, mat)]

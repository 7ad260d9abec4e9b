"""Diagonal of the Hessian: ``sum_k sign_k diag(J^T S_k S_k^T J)`` over the backpropagated
signed factors (the loss Hessian's root and each curved layer's residual, split by sign)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from backpack.extensions.base import Call
from backpack.extensions.secondorder.base import SecondOrderExtension, Stream


class DiagHessian(SecondOrderExtension):
    """``diag_h`` ``[*P]``: the exact Hessian diagonal."""

    def __init__(self, subsampling: list[int] | None = None):
        super().__init__("diag_h" if self.sum_batch else "diag_h_batch", subsampling)
        self.stream = Stream(residuals=True)

    def param_value(self, call: Call, io: Any, terms: dict, name: str) -> Tensor:
        """The backpropagated part plus the parameter's own residual (if the module's output
        is not linear in it)."""
        value = super().param_value(call, io, terms, name)
        g = call.view(self.subsampling)[1]
        own = call.rule.param_residual_diag(call.module, io, g, name, sum_batch=self.sum_batch)
        return value if own is None else value + own


class BatchDiagHessian(DiagHessian):
    """``diag_h_batch`` ``[N, *P]``: per-sample Hessian diagonals (sum = DiagHessian)."""

    sum_batch = False

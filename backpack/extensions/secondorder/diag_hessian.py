"""Diagonal of the Hessian: ``sum_k sign_k diag(J^T S_k S_k^T J)`` over the backpropagated
signed factors (the loss Hessian's root and each curved layer's residual, split by sign)."""

from __future__ import annotations

from torch import Tensor

from backpack.extensions.base import Call
from backpack.extensions.secondorder.base import SecondOrderExtension, SqrtHessianStream


class DiagHessian(SecondOrderExtension):
    """``diag_h`` ``[*P]``: the exact Hessian diagonal."""

    sum_batch = True

    def __init__(self, subsampling: list[int] | None = None):
        super().__init__("diag_h" if self.sum_batch else "diag_h_batch", subsampling)
        self.stream = SqrtHessianStream()

    def param_value(self, call: Call, io, terms: dict, name: str) -> Tensor:
        diag = call.rule.param_diag
        return sum(
            sign * diag(call.module, io, mat, name, sum_batch=self.sum_batch)
            for sign, mat in terms.values()
        )


class BatchDiagHessian(DiagHessian):
    """``diag_h_batch`` ``[N, *P]``: per-sample Hessian diagonals (sum = DiagHessian)."""

    sum_batch = False

"""Diagonal of the Hessian: ``sum_k sign_k diag(J^T S_k S_k^T J)`` over the backpropagated
signed factors (the loss Hessian's root and each curved layer's residual, split by sign)."""

from __future__ import annotations

from backpack.extensions.secondorder.base import SecondOrderExtension, Stream


class DiagHessian(SecondOrderExtension):
    """``diag_h`` ``[*P]``: the exact Hessian diagonal."""

    def __init__(self, subsampling: list[int] | None = None):
        super().__init__("diag_h" if self.sum_batch else "diag_h_batch", subsampling)
        self.stream = Stream(residuals=True)


class BatchDiagHessian(DiagHessian):
    """``diag_h_batch`` ``[N, *P]``: per-sample Hessian diagonals (sum = DiagHessian)."""

    sum_batch = False

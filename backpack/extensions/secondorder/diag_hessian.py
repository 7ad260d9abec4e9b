"""Diagonal of the Hessian: ``sum_k sign_k diag(J^T S_k S_k^T J)`` over the backpropagated
signed factors (the loss Hessian's root and each curved layer's residual, split by sign)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from backpack.derivatives.base import chunks
from backpack.engine.call import Call
from backpack.engine.reuse import Pieces
from backpack.engine.streams import Stream
from backpack.extensions.secondorder.base import SecondOrderExtension


class DiagHessian(SecondOrderExtension):
    """``diag_h`` ``[*P]``: the exact Hessian diagonal."""

    accepts_coupled_samples = True  # a whole-batch curvature: defined where samples couple

    def __init__(self, subsampling: list[int] | None = None):
        super().__init__("diag_h" if self.sum_batch else "diag_h_batch", subsampling)
        self.stream = Stream(residuals=True)

    def param_value(self, call: Call, io: Any, terms: dict, name: str) -> Tensor:
        """The backpropagated part plus the parameter's own residual (if the module's output
        is not linear in it).

        Returns:
            ``[*param]`` (``[n, *param]`` unless ``sum_batch``).
        """
        value = super().param_value(call, io, terms, name)
        g = call.view(self.subsampling)[1]
        own = call.rule.param_residual_diag(call.module, io, g, name, sum_batch=self.sum_batch)
        return value if own is None else value + own

    def add_pieces(self, call: Call, io: Any, terms: dict, name: str, pieces: Pieces) -> None:
        """The backpropagated pieces, and the parameter's own residual (it adds over calls)."""
        super().add_pieces(call, io, terms, name, pieces)
        g = call.view(self.subsampling)[1]
        residual = call.rule.param_residual_diag
        pieces.add(
            ("param_residual", pieces.pid(call, name), self.subsampling_key, self.sum_batch),
            lambda: residual(call.module, io, g, name, sum_batch=self.sum_batch),
        )

    def add_mixed(self, call: Call, io: Any, mixed: dict, name: str, pieces: Pieces) -> None:
        """``2 diag(M_c dx_c/dtheta)`` for the mixed derivatives ``M_c`` ``[P, n, *in]`` of this
        parameter: entry ``p`` of ``J^T M_c[p]`` (chunks of columns: ``J^T M_c`` is
        ``[P, n, P]``)."""
        pid = pieces.pid(call, name)
        mats = [m for o, (_, m) in mixed.items() if o.part[0] == pid]  # part: (pid, call)
        if not mats:
            return
        shape = call.module.get_parameter(name).shape

        def diagonal() -> Tensor:
            total = 0
            for mat in mats:
                p, n = mat.shape[:2]
                parts = []
                for idx in chunks(p, mat[0].numel() + n * p):
                    cols = call.rule.param_jac_t_mat_prod(
                        call.module, io, mat[idx], name, sum_batch=self.sum_batch
                    )
                    cols = cols.reshape(len(cols), -1, p)[:, :, idx]  # [k, (n,) k]
                    parts.append(cols.diagonal(dim1=0, dim2=2))
                total = total + 2 * torch.cat(parts, dim=-1)
            return total.reshape(shape) if self.sum_batch else total.reshape(-1, *shape)

        pieces.add(("mixed", pid, self.subsampling_key, self.sum_batch), diagonal)

    def finish_value(self, pieces: Pieces, pid: int) -> Tensor:
        """``SecondOrderExtension.finish_value`` plus the parameters' own residuals."""
        value = super().finish_value(pieces, pid)
        for kind in ("param_residual", "mixed"):
            own = pieces.sums.get((kind, pid, self.subsampling_key, self.sum_batch))
            value = value if own is None else value + own
        return value


class BatchDiagHessian(DiagHessian):
    """``diag_h_batch`` ``[N, *P]``: per-sample Hessian diagonals (sum = DiagHessian)."""

    accepts_coupled_samples = False  # per sample

    sum_batch = False

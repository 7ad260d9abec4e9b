"""Symmetric factorisation of the GGN: ``V [c, n, *P]`` with ``G = sum_{c, n} V_cn V_cn^T``.

``V = J^T S``: the backpropagated square root of the loss Hessian, pushed through the parameter
Jacobian per sample. Exact: one column per model output (``c``; the loss rule's column
convention, e.g. cross-entropy's ``diag(sqrt p) - p sqrt(p)^T``); MC: ``mc_samples`` sampled
columns. Several extended losses concatenate their columns.
"""

from __future__ import annotations

import torch
from torch import Tensor

from backpack.extensions.base import Call
from backpack.extensions.secondorder.base import SecondOrderExtension, Stream


class _SqrtGGN(SecondOrderExtension):
    def __init__(self, savefield: str, mc_samples: int | None, subsampling: list[int] | None):
        super().__init__(savefield, subsampling=subsampling)
        self.stream = Stream(mc_samples)

    def param_value(self, call: Call, io, terms: dict, name: str) -> Tensor:
        jac_t = call.rule.param_jac_t_mat_prod
        parts = [jac_t(call.module, io, m, name, sum_batch=False) for _, m in terms.values()]
        return torch.cat(parts)


class SqrtGGNExact(_SqrtGGN):
    """``sqrt_ggn_exact`` ``[C, N, *P]``: exact factor of the GGN."""

    def __init__(self, subsampling: list[int] | None = None):
        super().__init__("sqrt_ggn_exact", None, subsampling)


class SqrtGGNMC(_SqrtGGN):
    """``sqrt_ggn_mc`` ``[M, N, *P]``: Monte-Carlo factor (targets sampled from the model)."""

    def __init__(self, mc_samples: int = 1, subsampling: list[int] | None = None):
        super().__init__("sqrt_ggn_mc", mc_samples, subsampling)
        self.mc_samples = mc_samples

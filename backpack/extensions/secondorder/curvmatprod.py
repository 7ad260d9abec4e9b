"""Block curvature-matrix products, stored as callables: ``hmp``, ``ggnmp``, ``pchmp``.

For a parameter ``theta`` of a module whose output curvature is ``C = sum_k sign_k S_k S_k^T``
(the backpropagated stream), the stored ``f(mat)`` maps ``[V, *theta] -> [V, *theta]`` to
``J_theta^T C J_theta mat`` over the batch: the ``theta`` block of the GGN (exact root, no
residuals), of the Hessian (with the curved layers' residuals) or of the positive-curvature
Hessian (residuals' negative parts dropped, ``'clip'``, or counted positive, ``'abs'``).

A closure holds the module, its detached forward record and the factors, nothing else: it stays
valid after later backward passes and keeps no autograd graph alive.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module

from backpack.derivatives.base import IO, Rule
from backpack.extensions.base import Call
from backpack.extensions.secondorder.base import SecondOrderExtension, Stream, _is_coupled


def block_product(module: Module, rule: Rule, io: IO, terms: dict, name: str) -> Callable:
    """``mat [V, *theta] -> J^T (sum_k sign_k S_k S_k^T) J mat [V, *theta]``, summed over the
    batch, for the signed factors ``terms = {origin: (sign, S_k [c_k, n, *out])}``, per sample
    or (coupled origins, after BatchNorm with batch statistics) spanning the whole batch."""
    factors = torch.cat([m.detach() for _, m in terms.values()])  # [c, n, *out]
    signs = torch.cat(
        [
            torch.full((m.shape[0],), float(s), dtype=m.dtype, device=m.device)
            for s, m in terms.values()
        ]
    )
    coupled = torch.cat(
        [
            torch.full((m.shape[0], 1, 1), _is_coupled(o), device=m.device)
            for o, (_, m) in terms.items()
        ]
    )
    flat = factors.flatten(2)
    record = (io.inputs, io.output, io.kwargs)

    def product(mat: Tensor) -> Tensor:
        fresh = IO(*record)  # own memo: the forward call's cache belongs to its backward pass
        with torch.no_grad():
            jmat = rule.param_jac_mat_prod(module, fresh, mat, name).flatten(2)  # [V, n, k]
            # per-sample columns act on their own sample (block-diagonal over the batch),
            # coupled columns on the whole batch (their coefficient sums over n)
            coef = torch.einsum("cnk,vnk->cnv", flat, jmat) * signs[:, None, None]
            coef = torch.where(coupled, coef.sum(1, keepdim=True), coef)
            back = torch.einsum("cnv,cnk->vnk", coef, flat).view(-1, *factors.shape[1:])
            return rule.param_jac_t_mat_prod(module, fresh, back, name, sum_batch=True)

    return product


class _CurvMatProd(SecondOrderExtension):
    """Stores, per parameter, the product with its block of the stream's curvature."""

    def __init__(self, savefield: str, residuals: bool):
        super().__init__(savefield)
        self.stream = Stream(residuals=residuals)

    def modify(self, terms: dict) -> dict:
        """The signed factors whose curvature the product uses (all of them by default)."""
        return terms

    def param_value(self, call: Call, io: Any, terms: dict, name: str) -> Callable:
        return block_product(call.module, call.rule, io, self.modify(terms), name)


class GGNMP(_CurvMatProd):
    """``ggnmp``: ``f(mat [V, *P]) -> [V, *P]``, the parameter's GGN block times ``mat``."""

    def __init__(self, savefield: str = "ggnmp"):
        super().__init__(savefield, residuals=False)


class HMP(_CurvMatProd):
    """``hmp``: ``f(mat [V, *P]) -> [V, *P]``, the parameter's Hessian block times ``mat``."""

    def __init__(self, savefield: str = "hmp"):
        super().__init__(savefield, residuals=True)


class PCHMP(_CurvMatProd):
    """``pchmp``: ``f(mat [V, *P]) -> [V, *P]``, the positive-curvature Hessian block times
    ``mat``: each curved layer's residual ``r`` enters as ``max(r, 0)`` (``'clip'``) or
    ``|r|`` (``'abs'``)."""

    MODIFY = ("clip", "abs")

    def __init__(self, savefield: str = "pchmp", modify: str = "clip"):
        if modify not in self.MODIFY:
            raise ValueError(f"PCHMP: modify must be one of {self.MODIFY}, got {modify!r}.")
        super().__init__(savefield, residuals=True)
        self.modify_name = modify

    def modify(self, terms: dict) -> dict:
        """Residual parts carry their sign; the loss's root is always positive."""
        if self.modify_name == "clip":
            return {o: (s, m) for o, (s, m) in terms.items() if s > 0}
        return {o: (1.0, m) for o, (s, m) in terms.items()}

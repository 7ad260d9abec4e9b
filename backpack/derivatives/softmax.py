"""``nn.Softmax`` and ``nn.LogSoftmax`` along ``dim``, with ``p = softmax(x)``.

Their second derivatives couple the entries along ``dim``: the Hessian residual
``sum_k g_k d2y_k/dx2`` is one dense ``[c, c]`` block per sample and position, given to the
Hessian stream as its eigen-factors. A ``LogSoftmax`` right before ``NLLLoss`` adds none: that loss
already starts with the curvature of the pair (see ``NLLLossRule``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import backpack._torch_private as _tp
from backpack.derivatives.base import IO, Rule, blockwise_factors
from backpack.registry import register


class _SoftmaxBase(Rule):
    def dim(self, module: nn.Module, io: IO) -> int:
        """``module.dim`` as an axis of ``[v, n, *out]``."""
        d = (
            module.dim
            if module.dim is not None
            else _tp.softmax_dim(type(module).__name__.lower(), io.output.dim())
        )
        return d % io.output.dim() + 1

    def block(self, p: Tensor, g: Tensor) -> Tensor:
        """The residual block ``[..., c, c]`` from ``p`` and ``g`` ``[..., c]`` (``dim`` last)."""
        raise NotImplementedError

    def residual_factors(self, module: nn.Module, io: IO, g: Tensor) -> list[tuple[float, Tensor]]:
        d = self.dim(module, io) - 1  # axis of [n, *in]
        p = io.output.movedim(d, -1)
        p = p.exp() if isinstance(module, nn.LogSoftmax) else p
        return blockwise_factors(self.block(p, g.movedim(d, -1)), d)


@register(nn.LogSoftmax)
class LogSoftmaxRule(_SoftmaxBase):
    """``y = x - logsumexp(x)``; ``J = I - 1 p^T``."""

    closes_tag = "nll"  # a LogSoftmax right before NLLLoss: the pair's curvature came from the loss

    def block(self, p: Tensor, g: Tensor) -> Tensor:
        """``-(sum_k g_k) (diag(p) - p p^T)``: every output has the same second derivative."""
        cov = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
        return -g.sum(-1)[..., None, None] * cov

    def jac_t_mat_prod(self, module: nn.LogSoftmax, io: IO, mat: Tensor) -> Tensor:
        """``m - p sum(m)`` along ``dim``."""
        d = self.dim(module, io)
        return mat - io.output.exp() * mat.sum(d, keepdim=True)

    def jac_mat_prod(self, module: nn.LogSoftmax, io: IO, mat: Tensor) -> Tensor:
        """``m - sum(p m)`` along ``dim``."""
        d = self.dim(module, io)
        return mat - (io.output.exp() * mat).sum(d, keepdim=True)


@register(nn.Softmax)
class SoftmaxRule(_SoftmaxBase):
    """``y = p``; ``J = diag(p) - p p^T`` (symmetric)."""

    def block(self, p: Tensor, g: Tensor) -> Tensor:
        """``diag(u) - u p^T - p u^T`` with ``u = p (g - sum(g p))``."""
        u = p * (g - (g * p).sum(-1, keepdim=True))
        outer = u.unsqueeze(-1) * p.unsqueeze(-2)
        return torch.diag_embed(u) - outer - outer.transpose(-1, -2)

    def jac_t_mat_prod(self, module: nn.Softmax, io: IO, mat: Tensor) -> Tensor:
        """``p (m - sum(p m))`` along ``dim``."""
        p = io.output
        return p * (mat - (p * mat).sum(self.dim(module, io), keepdim=True))

    jac_mat_prod = jac_t_mat_prod

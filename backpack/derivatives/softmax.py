"""``nn.Softmax`` and ``nn.LogSoftmax`` along ``dim``, with ``p = softmax(x)``.

Their second derivatives couple the entries along ``dim`` (no diagonal residual), so the Hessian
stream cannot pass them, except a ``LogSoftmax`` right before ``NLLLoss``: that loss already starts
with the curvature of the pair (see ``NLLLossRule``), and the residual is skipped there.
"""

from __future__ import annotations

from torch import Tensor, nn

from backpack.derivatives.base import IO, Rule, register


class _SoftmaxBase(Rule):
    def dim(self, module: nn.Module, io: IO) -> int:
        """``module.dim`` as an axis of ``[v, n, *out]``."""
        d = (
            module.dim
            if module.dim is not None
            else nn.functional._get_softmax_dim(type(module).__name__.lower(), io.output.dim(), 3)
        )
        return d % io.output.dim() + 1

    def residual_diag(self, module: nn.Module, io: IO, g: Tensor) -> Tensor:
        raise NotImplementedError(
            f"DiagHessian/BatchDiagHessian through {module}: its second derivative is not "
            "diagonal. Use CrossEntropyLoss on the logits (or LogSoftmax directly before NLLLoss)."
        )


@register(nn.LogSoftmax)
class LogSoftmaxRule(_SoftmaxBase):
    """``y = x - logsumexp(x)``; ``J = I - 1 p^T``."""

    closes_tag = "nll"  # a LogSoftmax right before NLLLoss: the pair's curvature came from the loss

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

    def jac_t_mat_prod(self, module: nn.Softmax, io: IO, mat: Tensor) -> Tensor:
        """``p (m - sum(p m))`` along ``dim``."""
        p = io.output
        return p * (mat - (p * mat).sum(self.dim(module, io), keepdim=True))

    jac_mat_prod = jac_t_mat_prod

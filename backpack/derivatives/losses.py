"""Loss rules: square roots ``S [c, n, *out]`` of the loss Hessian w.r.t. the model output.

Exact: ``sum_c S_c S_c^T = d2 loss / d out2``. Sampled (``mc_samples = m``): ``S [m, n, *out]``
with targets drawn from the model's likelihood and scaled by ``1/sqrt(m)``, so that
``E[sum_m S_m S_m^T]`` is that same Hessian (the Fisher, which for these losses equals the GGN's
loss Hessian). Both carry the reduction's normaliser: ``1/sqrt(normaliser)`` for ``'mean'``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from backpack.derivatives.base import IO, LossRule, Request, diag_columns
from backpack.registry import register


class _Loss(LossRule):
    """Shared argument access, normaliser and checks of the loss rules."""

    needs_output = False  # the scalar loss value is never used

    @staticmethod
    def _args(io: IO) -> tuple[Tensor, Tensor]:
        """``(model output, target)``, given positionally or as ``input=``/``target=``."""
        x = io.inputs[0] if io.inputs else io.kwargs["input"]
        y = io.inputs[1] if len(io.inputs) > 1 else io.kwargs["target"]
        return x, y

    def normaliser(self, module: nn.Module, io: IO) -> Tensor | float:
        """What ``reduction='mean'`` divides the summed loss by (1 for ``'sum'``)."""
        x, _ = self._args(io)
        return x.numel() if module.reduction == "mean" else 1.0

    def check(self, module: nn.Module, io: IO, request: Request | None) -> None:
        second_order = request is None or request.second_order
        if second_order and module.reduction not in ("mean", "sum"):
            ext = request.name if request is not None else "second-order extensions"
            raise ValueError(
                f"{type(module).__name__}(reduction={module.reduction!r}): {ext} need(s) the "
                "scalar loss; use reduction='mean' or 'sum'."
            )


@register(nn.MSELoss)
class MSELossRule(_Loss):
    """``loss = sum (out - y)^2 [/ numel]``, any output shape: Hessian ``2/normaliser I``."""

    def sqrt_hessian(self, module: nn.MSELoss, io: IO) -> Tensor:
        """``sqrt(2/normaliser) I`` as ``[d, n, *out]``, ``d = numel/n``."""
        x, _ = self._args(io)
        scale = math.sqrt(2.0 / self.normaliser(module, io))
        return diag_columns(torch.full_like(x, scale))

    def sqrt_hessian_sampled(self, module: nn.MSELoss, io: IO, mc_samples: int) -> Tensor:
        """``sqrt(2/normaliser) eps / sqrt(m)``, ``eps ~ N(0, I)``: ``[m, n, *out]``."""
        x, _ = self._args(io)
        scale = math.sqrt(2.0 / self.normaliser(module, io) / mc_samples)
        return torch.randn(mc_samples, *x.shape, dtype=x.dtype, device=x.device) * scale


@register(nn.CrossEntropyLoss)
class CrossEntropyLossRule(_Loss):
    """Softmax cross-entropy over axis 1 of ``out [n, C, *d]``.

    Per position the Hessian is ``a (diag(p) - p p^T)`` with ``p = softmax(out)`` and ``a`` the
    summed weight of the (smoothed) target distribution ``q``: the loss ``sum_k q_k w_k (-log p_k)``
    is ``(sum_k q_k w_k) logsumexp(out)`` plus a term linear in ``out``. Class-index targets:
    ``q = (1 - eps) onehot(y) + eps/C``, ignored positions ``a = 0``, ``'mean'`` divides by
    ``sum w_y`` over non-ignored positions. Probability targets ``t``: ``q = (1 - eps) t + eps/C``,
    ``'mean'`` divides by the number of positions ``n * prod(d)`` (PyTorch's definition).
    """

    def check(self, module: nn.CrossEntropyLoss, io: IO, request: Request | None) -> None:
        super().check(module, io, request)
        x, _ = self._args(io)
        if x.dim() < 2:
            raise ValueError(
                f"{type(module).__name__}: input of shape {tuple(x.shape)} has no batch axis; "
                "second-order extensions need input [n, C, *d]."
            )

    @staticmethod
    def _weights(module: nn.CrossEntropyLoss, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Class weights ``w [C]`` and, for class-index targets, ``w_y [n, *d]`` (0 where
        ignored; None for probability targets)."""
        w = module.weight
        w = torch.ones(x.shape[1], dtype=x.dtype, device=x.device) if w is None else w.to(x.dtype)
        if y.is_floating_point():
            return w, None
        valid = y != module.ignore_index
        return w, w[torch.where(valid, y, 0)] * valid

    def normaliser(self, module: nn.CrossEntropyLoss, io: IO) -> Tensor | float:
        """``'mean'``: the summed weights ``w_y`` of the non-ignored targets (class indices),
        the number of positions ``n * prod(d)`` (probability targets); 1 for ``'sum'``."""
        if module.reduction != "mean":
            return 1.0
        x, y = self._args(io)
        w_y = self._weights(module, x, y)[1]
        return float(y.numel() // x.shape[1]) if w_y is None else w_y.sum()

    def _curvature(self, module: nn.CrossEntropyLoss, io: IO) -> tuple[Tensor, Tensor]:
        """``p [n, C, *d]`` and the per-position factor ``a / normaliser`` ``[n, *d]``."""
        x, y = self._args(io)
        p = x.softmax(1)
        C, eps = x.shape[1], getattr(module, "label_smoothing", 0.0)
        w, w_y = self._weights(module, x, y)
        if w_y is None:  # probability targets [n, C, *d]
            a = torch.einsum("nc...,c->n...", y * (1 - eps) + eps / C, w)
        else:
            a = (1 - eps) * w_y + eps / C * w.sum() * (y != module.ignore_index)
        return p, a / self.normaliser(module, io)

    def sqrt_hessian(self, module: nn.CrossEntropyLoss, io: IO) -> Tensor:
        """Per position ``j``, columns of ``sqrt(a_j/norm) (diag(sqrt p_j) - p_j sqrt(p_j)^T)``.

        Shape ``[C * D, n, C, *d]`` with ``D = prod(d)``; column ``k * D + j`` (class ``k`` at
        position ``j``) is ``sqrt(a_j/norm) sqrt(p_kj) (e_k - p_j)`` at position ``j``, zero
        elsewhere (it is the scaled gradient of ``-log p_k`` at ``j``).
        """
        blocks, _ = self._blocks(module, io)
        return self._place(blocks, io)

    def sqrt_hessian_lean(self, module: nn.CrossEntropyLoss, io: IO) -> Tensor:
        """``C - 1`` columns per position (the Hessian's rank) ``[(C - 1) D, n, C, *d]``.

        A position's block ``M`` (above) has ``M sqrt(p) = 0``. The Householder reflection
        ``Q = I - 2 u u^T / |u|^2``, ``u = sqrt(p) - e_r``, swaps ``sqrt(p)`` and ``e_r``, so
        ``(M Q) e_r = 0`` and ``M Q`` without column ``r`` is a root of the same block; ``r`` is
        the least likely class (``|u|^2 = 2 (1 - sqrt(p_r)) >= 2 - sqrt(2)``). With
        ``M u = -M e_r``: ``M Q = M + M e_r u^T / (1 - sqrt(p_r))``.
        """
        blocks, root = self._blocks(module, io)
        classes = root.shape[-1]
        if classes < 2:
            return self._place(blocks, io)
        r = root.argmin(-1, keepdim=True)  # [n, D, 1]
        u = root - nn.functional.one_hot(r[..., 0], classes).to(root.dtype)
        col_r = blocks.gather(-1, r.unsqueeze(-2).expand(*blocks.shape[:-1], 1))
        blocks = blocks + col_r * (u / (1 - root.gather(-1, r))).unsqueeze(-2)
        keep = torch.arange(classes - 1, device=r.device)
        keep = (keep + (keep >= r)).unsqueeze(-2).expand(*blocks.shape[:-1], classes - 1)
        return self._place(blocks.gather(-1, keep), io)

    def _blocks(self, module: nn.CrossEntropyLoss, io: IO) -> tuple[Tensor, Tensor]:
        """Per sample and position the block ``sqrt(a/norm) (diag(sqrt p) - p sqrt(p)^T)``
        ``[n, D, C (entries), C (columns)]`` and ``sqrt(p)`` ``[n, D, C]``."""
        p, factor = self._curvature(module, io)
        pj = p.reshape(p.shape[0], p.shape[1], -1).transpose(1, 2)  # [n, D, C]
        root = pj.sqrt()
        blocks = torch.diag_embed(root) - pj.unsqueeze(-1) * root.unsqueeze(-2)
        return blocks * factor.reshape(p.shape[0], -1, 1, 1).sqrt(), root

    def _place(self, blocks: Tensor, io: IO) -> Tensor:
        """Blocks ``[n, D, C, K]`` -> columns ``[K * D, n, C, *d]``: column ``k * D + j`` is
        block column ``k`` of position ``j``, at position ``j`` only."""
        n, positions, classes, k = blocks.shape
        eye = torch.eye(positions, dtype=blocks.dtype, device=blocks.device)
        columns = torch.einsum("njak,jl->kjnal", blocks, eye)
        return columns.reshape(k * positions, n, classes, *self._args(io)[0].shape[2:])

    def sqrt_hessian_sampled(self, module: nn.CrossEntropyLoss, io: IO, mc_samples: int) -> Tensor:
        """``(p - onehot(y_hat)) sqrt(a/norm) / sqrt(m)`` ``[m, n, C, *d]``, ``y_hat ~ Cat(p)``."""
        p, factor = self._curvature(module, io)
        flat = p.movedim(1, -1).reshape(-1, p.shape[1])  # [n * D, C]
        y_hat = torch.multinomial(flat, mc_samples, replacement=True).T  # [m, n * D]
        onehot = nn.functional.one_hot(y_hat, p.shape[1]).to(p.dtype)
        onehot = onehot.reshape(mc_samples, p.shape[0], *p.shape[2:], p.shape[1]).movedim(-1, 2)
        scale = (factor / mc_samples).sqrt().unsqueeze(1)  # [n, 1, *d]
        return (p - onehot) * scale


@register(nn.BCEWithLogitsLoss)
class BCEWithLogitsLossRule(_Loss):
    """``loss = -w [pw t log s + (1 - t) log(1 - s)]``, ``s = sigmoid(out)``, any output shape.

    Elementwise Hessian ``h = w s (1 - s) (pw t + 1 - t)`` (``w = weight``, ``pw = pos_weight``
    broadcast as PyTorch does); ``'mean'`` divides by ``numel``.
    """

    def _factors(self, module: nn.BCEWithLogitsLoss, io: IO) -> tuple[Tensor, Tensor]:
        """``s`` and the target-dependent factor ``w (pw t + 1 - t) / norm``, both ``[n, *out]``."""
        x, t = self._args(io)
        c = torch.ones_like(x)
        if module.pos_weight is not None:
            c = c + (module.pos_weight - 1) * t
        if module.weight is not None:
            c = c * module.weight
        return x.sigmoid(), c / self.normaliser(module, io)

    def sqrt_hessian(self, module: nn.BCEWithLogitsLoss, io: IO) -> Tensor:
        """``diag(sqrt(h / norm))`` as ``[d, n, *out]``, ``d = numel/n``."""
        s, c = self._factors(module, io)
        return diag_columns((s * (1 - s) * c).sqrt())

    def sqrt_hessian_sampled(self, module: nn.BCEWithLogitsLoss, io: IO, mc_samples: int) -> Tensor:
        """``(s - t_hat) sqrt(w (pw t + 1 - t) / norm) / sqrt(m)``, ``t_hat ~ Bernoulli(s)``.

        ``s - t_hat`` is the gradient of the unweighted loss at the sampled target, with
        ``E[(s - t_hat)^2] = s (1 - s)``; the weights enter through the data target ``t`` (not
        the weighted loss' gradient at ``t_hat``, whose square has expectation
        ``w^2 s (1 - s) (pw^2 (1 - s) + s)``), so that the expectation is the exact Hessian.
        """
        s, c = self._factors(module, io)
        t_hat = torch.bernoulli(s.expand(mc_samples, *s.shape))
        return (s - t_hat) * (c / mc_samples).sqrt()


@register(nn.NLLLoss)
class NLLLossRule(CrossEntropyLossRule):
    """``loss = -w_y out_y`` on log-probabilities ``out = log p``, as after ``nn.LogSoftmax``.

    NLLLoss itself is linear (zero Hessian); the curvature of ``LogSoftmax -> NLLLoss`` lies in
    the LogSoftmax. Like BackPACK users expect, the root is the pair's, i.e. cross-entropy's, with
    ``p = exp(out)``: since its columns sum to zero over classes, LogSoftmax's ``J^T = I - p 1^T``
    passes them unchanged, and that LogSoftmax adds no residual (origins tagged ``"nll"``).
    """

    origin_tag = "nll"

    def check(self, module: nn.NLLLoss, io: IO, request: Request | None) -> None:
        super().check(module, io, request)
        x, _ = self._args(io)
        second_order = request is None or request.second_order
        if second_order and not torch.allclose(x.logsumexp(1), x.new_zeros(()), atol=1e-4):
            raise ValueError(
                f"{module} with {request.name}: the input is not log-probabilities "
                "(logsumexp over axis 1 is not 0). Put nn.LogSoftmax(dim=1) before NLLLoss, or "
                "use CrossEntropyLoss on the logits."
            )

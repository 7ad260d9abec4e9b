"""Elementwise regression losses: diagonal Hessian w.r.t. the model output, ``h [n, *out]``.

Exact root ``diag(sqrt(h / normaliser))`` (``'mean'`` divides by ``numel`` as PyTorch does);
sampled roots use the gradient of the loss at targets drawn from the model's likelihood.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from backpack.derivatives.base import IO, diag_columns
from backpack.derivatives.losses import _Loss
from backpack.registry import register


class _ElementwiseLoss(_Loss):
    """``sqrt_hessian`` from the elementwise Hessian ``hessian(module, io) [n, *out]``."""

    def hessian(self, module: nn.Module, io: IO) -> Tensor:
        """Elementwise second derivative of the unreduced loss w.r.t. the output."""
        raise NotImplementedError

    def sqrt_hessian(self, module: nn.Module, io: IO) -> Tensor:
        """``diag(sqrt(h / normaliser))`` as ``[d, n, *out]``, ``d = numel/n``."""
        return diag_columns((self.hessian(module, io) / self.normaliser(module, io)).sqrt())

    def sqrt_hessian_sampled(self, module: nn.Module, io: IO, mc_samples: int) -> Tensor:
        raise NotImplementedError(
            f"{type(module).__name__} is not a negative log-likelihood: there is no model "
            "distribution to sample targets from, so MC extensions (DiagGGNMC, KFAC) are not "
            "supported. Use the exact extensions (DiagGGNExact, KFLR)."
        )


@register(nn.HuberLoss, nn.SmoothL1Loss)
class HuberLossRule(_ElementwiseLoss):
    """Huber (``delta``) / SmoothL1 (``beta``): Hessian ``1`` resp. ``1/beta`` where
    ``|out - y| < delta`` resp. ``beta``, else ``0`` (``beta = 0`` is L1: zero everywhere)."""

    def hessian(self, module: nn.HuberLoss | nn.SmoothL1Loss, io: IO) -> Tensor:
        x, y = self._args(io)
        width = module.delta if isinstance(module, nn.HuberLoss) else module.beta
        inside = ((x - y).abs() < width).to(x.dtype)
        scale = 1.0 if isinstance(module, nn.HuberLoss) or width == 0 else 1.0 / width
        return inside * scale


@register(nn.PoissonNLLLoss)
class PoissonNLLLossRule(_ElementwiseLoss):
    """``log_input``: ``exp(out) - y out``, Hessian ``exp(out)``; else ``out - y log(out + eps)``,
    Hessian ``y / (out + eps)^2``. ``full`` adds a term in ``y`` only (no curvature)."""

    def hessian(self, module: nn.PoissonNLLLoss, io: IO) -> Tensor:
        x, y = self._args(io)
        return x.exp() if module.log_input else y / (x + module.eps) ** 2

    def sqrt_hessian_sampled(self, module: nn.PoissonNLLLoss, io: IO, mc_samples: int) -> Tensor:
        """``(rate - y_hat) / sqrt(m)`` (scaled), ``y_hat ~ Poisson(rate)``: ``[m, n, *out]``.

        ``log_input``: the gradient ``exp(out) - y_hat``, expectation of its square ``exp(out)``
        (the Hessian). Otherwise ``(y_hat - out) / (out + eps)``: its expectation is the Fisher
        ``out / (out + eps)^2``, the Hessian's expectation over ``y``, not its value at the data.
        """
        x, _ = self._args(io)
        rate = x.exp() if module.log_input else x
        y_hat = torch.poisson(rate.expand(mc_samples, *x.shape).contiguous())
        g = rate - y_hat if module.log_input else (y_hat - x) / (x + module.eps)
        return g / math.sqrt(mc_samples * self.normaliser(module, io))


@register(nn.GaussianNLLLoss)
class GaussianNLLLossRule(_ElementwiseLoss):
    """``0.5 (log var + (out - y)^2 / var)`` w.r.t. the mean ``out``: Hessian ``1 / var``.

    ``var`` (third argument or ``var=``) is given, clamped at ``eps`` and broadcast as PyTorch
    does (``[n, *out]``, last axis 1, or ``out`` without its last axis).
    """

    def _var(self, module: nn.GaussianNLLLoss, io: IO) -> Tensor:
        x, _ = self._args(io)
        var = io.inputs[2] if len(io.inputs) > 2 else io.kwargs["var"]
        if var.shape != x.shape and var.shape == x.shape[:-1]:
            var = var.unsqueeze(-1)
        return var.clamp(min=module.eps).expand_as(x)

    def hessian(self, module: nn.GaussianNLLLoss, io: IO) -> Tensor:
        return 1.0 / self._var(module, io)

    def sqrt_hessian_sampled(self, module: nn.GaussianNLLLoss, io: IO, mc_samples: int) -> Tensor:
        """``eps / sqrt(var m normaliser)``, ``eps ~ N(0, I)``: gradient at ``y ~ N(out, var)``."""
        x, _ = self._args(io)
        eps = torch.randn(mc_samples, *x.shape, dtype=x.dtype, device=x.device)
        return eps / (self._var(module, io) * mc_samples * self.normaliser(module, io)).sqrt()

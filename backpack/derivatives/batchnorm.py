"""``nn.BatchNorm1d/2d/3d`` in eval mode: ``out = xhat * w[c] + b[c]`` with channel axis 1 and
``xhat = (x - running_mean[c]) / sqrt(running_var[c] + eps)``, inputs ``[n, c]`` or ``[n, c, *s]``.

With batch statistics (training mode, or ``track_running_stats=False``) mean and variance are
taken over ``n`` and ``s`` per channel, so every output depends on every sample: the Jacobian is
``w istd / M (I - 1 1^T / M - xhat xhat^T / M)`` per channel (``M = n * |s|``, symmetric) and
``couples_samples`` tells the second-order streams to fold a source-sample axis into their
columns. Whole-batch curvature (DiagGGN, DiagHessian, GGNMP/HMP/PCHMP, and SqrtGGN, whose
``[C, N, *P]`` then holds whole-batch gradients of the loss-Hessian root's columns, see
``secondorder.sqrt_ggn``) is exact; per-sample quantities are undefined and raise (see
``backpack.utils.errors``), except first-order ones under ``backpack(...,
batchnorm_contributions=True)`` (contributions ``J_n^T g_n`` summing to ``.grad``). Kronecker
factors (KFAC, KFLR, KFRA) raise: they assume independent samples (BatchNorm has none in
BackPACK 1.7 either).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from backpack.derivatives.base import IO, Request, Rule, dense_factors
from backpack.registry import register
from backpack.utils.errors import batch_norm_raise_error_if_train, uses_batch_statistics


def _per_channel(t: Tensor, spatial_dims: int) -> Tensor:
    """View ``[c]`` as ``[c, 1, ...]`` to broadcast against ``[..., c, *s]``."""
    return t.view(-1, *[1] * spatial_dims)


@register(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
class BatchNormRule(Rule):
    """Jacobian products of BatchNorm with running statistics: a per-channel affine map."""

    needs_output = False

    def refuse_coupled(self, module: nn.Module, request: Request) -> None:
        """Batch statistics couple the samples: per-sample quantities are undefined."""
        batch_norm_raise_error_if_train(module, extension=request.name)

    def couples_samples(self, module: nn.Module) -> bool:
        """Whether each output depends on every sample (batch statistics)."""
        return uses_batch_statistics(module)

    def _stats(self, module: nn.modules.batchnorm._BatchNorm, io: IO) -> tuple[Tensor, Tensor]:
        """Mean and ``1 / sqrt(var + eps)`` ``[c]``: batch (biased) or running statistics."""
        if not uses_batch_statistics(module):
            return module.running_mean, (module.running_var + module.eps).rsqrt()
        if "stats" not in io.cache:
            x = io.input0
            dims = [0, *range(2, x.dim())]
            var, mean = torch.var_mean(x, dim=dims, correction=0)
            io.cache["stats"] = mean, (var + module.eps).rsqrt()
        return io.cache["stats"]

    def _xhat(self, module: nn.modules.batchnorm._BatchNorm, io: IO) -> Tensor:
        """Normalised input ``[n, c, *s]``."""
        x = io.input0
        mean, inv_std = self._stats(module, io)
        return (x - _per_channel(mean, x.dim() - 2)) * _per_channel(inv_std, x.dim() - 2)

    def _scale(self, module: nn.modules.batchnorm._BatchNorm, io: IO) -> Tensor:
        """``w / sqrt(var + eps)`` per channel ``[c]``."""
        inv_std = self._stats(module, io)[1]
        return inv_std if module.weight is None else module.weight * inv_std

    def jac_t_mat_prod(self, module: nn.Module, io: IO, mat: Tensor) -> Tensor:
        """``[v, n, c, *s] -> [v, n, c, *s]``: ``mat * scale[c]``; with batch statistics
        ``scale (mat - mean_ns(mat) - xhat mean_ns(mat xhat))`` (mixes the samples)."""
        scaled = mat * _per_channel(self._scale(module, io), mat.dim() - 3)
        if not uses_batch_statistics(module):
            return scaled
        xhat = self._xhat(module, io)
        dims = [1, *range(3, mat.dim())]
        return (
            scaled
            - scaled.mean(dims, keepdim=True)
            - xhat * (scaled * xhat).mean(dims, keepdim=True)
        )

    def jac_mat_prod(self, module: nn.Module, io: IO, mat: Tensor) -> Tensor:
        """``[v, n, c, *s] -> [v, n, c, *s]``: the Jacobian is symmetric (per channel)."""
        return self.jac_t_mat_prod(module, io, mat)

    def residual_factors(self, module: nn.Module, io: IO, g: Tensor) -> list[tuple[float, Any]]:
        """Signed factors ``[r, n, c, *s]`` of ``d2 <g, out> / dx2``, zero with running
        statistics; with batch statistics a dense whole-batch matrix (coupled columns,
        ``r = n c |s|``), factored by eigendecomposition."""
        if not uses_batch_statistics(module):
            return []
        x = io.input0
        mean_dims = [0, *range(2, x.dim())]
        w = _per_channel(module.weight, x.dim() - 2) if module.weight is not None else 1.0

        def inner(z: Tensor) -> Tensor:
            var, mean = torch.var_mean(z, dim=mean_dims, correction=0, keepdim=True)
            return (g * w * (z - mean) * (var + module.eps).rsqrt()).sum()

        hess = torch.func.hessian(inner)(x).reshape(x.numel(), x.numel())
        # one "sample" holding the whole batch: columns [r, 1, n, ...] -> coupled [r, n, ...]
        return [(sign, r.squeeze(1)) for sign, r in dense_factors(hess.unsqueeze(0), x.shape)]

    def param_jac_mat_prod(self, module: nn.Module, io: IO, mat: Tensor, name: str) -> Tensor:
        """``[v, c] -> [v, n, c, *s]``: ``mat[c] * xhat`` (weight), ``mat[c]`` (bias); direct,
        as the generic forward-mode version would update the running statistics."""
        x = io.input0
        per_channel = mat.view(mat.shape[0], 1, -1, *[1] * (x.dim() - 2))
        if name == "weight":
            return per_channel * self._xhat(module, io)
        return per_channel.expand(-1, *x.shape)

    def kron_factors(self, module: nn.Module, io: IO, mat: Tensor, name: str) -> None:
        """Elementwise scale and shift have no Kronecker structure: Kronecker extensions store
        their exact ``[P, P]`` curvature block ``[G]`` (``P`` = channels or normalised entries)."""
        return None

    def param_jac_t_mat_prod(
        self, module: nn.Module, io: IO, mat: Tensor, name: str, sum_batch: bool = True
    ) -> Tensor:
        """``[v, n, c, *s] -> [v, (n,) c]``: ``sum_s mat * xhat`` (weight), ``sum_s mat`` (bias)."""
        if name == "weight":
            mat = mat * self._xhat(module, io)
        out = mat.flatten(3).sum(3) if mat.dim() > 3 else mat
        return out.sum(1) if sum_batch else out

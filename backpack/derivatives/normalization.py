"""Per-sample normalisation layers: ``out = xhat * w + b`` with ``xhat = (x - mu) / sigma`` over a
group of entries of one sample (``mu = 0`` for RMSNorm), ``w``, ``b`` broadcast per channel.

Groups: LayerNorm/RMSNorm the trailing ``normalized_shape`` entries at each leading position,
GroupNorm ``C / groups`` channels times all positions, InstanceNorm one channel's positions. The
input viewed as ``[n, p, G]`` (``p`` groups of ``G`` entries) is a plain reshape in every case.
Samples never interact, so every extension is exact. InstanceNorm with running statistics in eval
mode is a per-channel affine map (``mu``, ``sigma`` fixed).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import grad, jacfwd, vmap

from backpack.derivatives.base import IO, Request, Rule, blockwise_factors
from backpack.registry import register, register_by_name


class _NormRule(Rule):
    """Shared math; subclasses say how the input splits into groups and where ``w`` broadcasts."""

    needs_output = False

    def group_size(self, module: nn.Module, x: Tensor) -> int:
        """Entries ``G`` of one normalised group of ``x`` ``[n, *in]`` (contiguous, row-major)."""
        raise NotImplementedError

    def param_view(self, module: nn.Module, x: Tensor) -> tuple[int, ...]:
        """Shape of ``w`` broadcast against one sample ``[*in]`` (1 on the other axes)."""
        raise NotImplementedError

    def centred(self, module: nn.Module) -> bool:
        """Whether the group mean is subtracted (False for RMSNorm)."""
        return True

    def eps(self, module: nn.Module, x: Tensor) -> float:
        return module.eps

    def running(self, module: nn.Module) -> bool:
        """Whether fixed running statistics replace the group statistics."""
        return False

    def _stats(self, module: nn.Module, io: IO) -> tuple[Tensor, Tensor]:
        """``xhat [n, p, G]`` and ``1 / sigma [n, p, 1]`` of the recorded input (memoised)."""
        if "norm" not in io.cache:
            x = io.input0
            xg = x.reshape(x.shape[0], -1, self.group_size(module, x))
            if self.centred(module):
                xg = xg - xg.mean(-1, keepdim=True)
            inv = (xg.square().mean(-1, keepdim=True) + self.eps(module, x)).rsqrt()  # biased var
            io.cache["norm"] = (xg * inv, inv)
        return io.cache["norm"]

    def _weight(self, module: nn.Module, x: Tensor) -> Tensor | None:
        w = getattr(module, "weight", None)
        return None if w is None else w.reshape(self.param_view(module, x))

    def _norm_jac(self, module: nn.Module, io: IO, mat: Tensor) -> Tensor:
        """``d xhat / dx`` (symmetric) on ``[v, n, *in]``: per group
        ``(m - mean(m) - xhat mean(m xhat)) / sigma`` (no ``mean(m)`` term for RMSNorm)."""
        if self.running(module):
            return mat * self._running_inv(module, io.input0)
        xhat, inv = self._stats(module, io)
        m = mat.reshape(mat.shape[0], *xhat.shape)
        out = m - xhat * (m * xhat).mean(-1, keepdim=True)
        if self.centred(module):
            out = out - m.mean(-1, keepdim=True)
        return (out * inv).reshape(mat.shape)

    def _running_inv(self, module: nn.Module, x: Tensor) -> Tensor:
        return (module.running_var + module.eps).rsqrt().reshape(self.param_view(module, x))

    def _xhat(self, module: nn.Module, io: IO) -> Tensor:
        """``xhat`` in the input's shape ``[n, *in]``."""
        x = io.input0
        if self.running(module):
            mean = module.running_mean.reshape(self.param_view(module, x))
            return (x - mean) * self._running_inv(module, x)
        return self._stats(module, io)[0].reshape(x.shape)

    def jac_t_mat_prod(self, module: nn.Module, io: IO, mat: Tensor) -> Tensor:
        """``[v, n, *out] -> [v, n, *in]``: ``J_norm^T (w m)``."""
        w = self._weight(module, io.input0)
        return self._norm_jac(module, io, mat if w is None else mat * w)

    def jac_mat_prod(self, module: nn.Module, io: IO, mat: Tensor) -> Tensor:
        """``[v, n, *in] -> [v, n, *out]``: ``w J_norm m``."""
        w = self._weight(module, io.input0)
        out = self._norm_jac(module, io, mat)
        return out if w is None else out * w

    def kron_factors(self, module: nn.Module, io: IO, mat: Tensor, name: str) -> None:
        """Elementwise scale and shift have no Kronecker structure: Kronecker extensions store
        their exact ``[P, P]`` curvature block ``[G]`` (``P`` = channels or normalised entries)."""
        return None

    def param_jac_t_mat_prod(
        self, module: nn.Module, io: IO, mat: Tensor, name: str, sum_batch: bool = True
    ) -> Tensor:
        """``[v, n, *out] -> [v, (n,) *param]``: ``sum mat * xhat`` (weight), ``sum mat`` (bias)
        over the axes the parameter broadcasts along."""
        x = io.input0
        if name == "weight":
            mat = mat * self._xhat(module, io)
        param = getattr(module, name)
        out = mat.sum_to_size(*mat.shape[:2], *self.param_view(module, x))
        out = out.reshape(*mat.shape[:2], *param.shape)
        return out.sum(1) if sum_batch else out

    def residual_factors(self, module: nn.Module, io: IO, g: Tensor) -> list[tuple[float, Tensor]]:
        """Factors of ``sum_k (w g)_k d2 xhat_k / dx2``: one dense ``[G, G]`` block per group,
        each by forward-over-reverse AD of one group's normalisation (vmapped over groups)."""
        if self.running(module):
            return []
        x = io.input0
        w = self._weight(module, x)
        gw = (g if w is None else g * w).reshape(x.shape[0], -1, self.group_size(module, x))
        xg = x.reshape(gw.shape)
        eps, centred = self.eps(module, x), self.centred(module)

        def inner(xi: Tensor, gi: Tensor) -> Tensor:
            c = xi - xi.mean() if centred else xi
            return (gi * c * (c.square().mean() + eps).rsqrt()).sum()

        block = vmap(jacfwd(grad(inner)))
        hess = block(xg.flatten(0, 1), gw.flatten(0, 1)).reshape(*gw.shape, gw.shape[-1])
        factors = blockwise_factors(hess, 2)  # [p * G, n, p, G]: entries on axis 2 of [n, p, G]
        return [(sign, r.reshape(r.shape[0], *x.shape)) for sign, r in factors]


@register_by_name("timm.layers.norm.LayerNorm")  # F.layer_norm, as nn.LayerNorm
@register(nn.LayerNorm)
class LayerNormRule(_NormRule):
    """Groups: the trailing ``normalized_shape`` entries; ``w`` has that shape."""

    def group_size(self, module: nn.LayerNorm, x: Tensor) -> int:
        return int(torch.Size(module.normalized_shape).numel())

    def param_view(self, module: nn.LayerNorm, x: Tensor) -> tuple[int, ...]:
        shape = tuple(module.normalized_shape)
        return (1,) * (x.dim() - 1 - len(shape)) + shape


@register(nn.RMSNorm)
class RMSNormRule(LayerNormRule):
    """LayerNorm without centring; ``eps=None`` means the dtype's machine epsilon."""

    def centred(self, module: nn.RMSNorm) -> bool:
        return False

    def eps(self, module: nn.RMSNorm, x: Tensor) -> float:
        return torch.finfo(x.dtype).eps if module.eps is None else module.eps


class _ChannelNormRule(_NormRule):
    """Input ``[n, C, *s]``; ``w`` per channel ``C``."""

    def param_view(self, module: nn.Module, x: Tensor) -> tuple[int, ...]:
        return (x.shape[1],) + (1,) * (x.dim() - 2)


@register(nn.GroupNorm)
class GroupNormRule(_ChannelNormRule):
    """Groups: ``C / num_groups`` consecutive channels times all positions."""

    def group_size(self, module: nn.GroupNorm, x: Tensor) -> int:
        return x[0].numel() // module.num_groups


@register(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
class InstanceNormRule(_ChannelNormRule):
    """Groups: one channel's positions; running statistics in eval mode if tracked."""

    def group_size(self, module: nn.modules.instancenorm._InstanceNorm, x: Tensor) -> int:
        return x[0, 0].numel()

    def running(self, module: nn.modules.instancenorm._InstanceNorm) -> bool:
        return module.track_running_stats and not module.training

    def check(self, module: nn.Module, io: IO, request: Request | None) -> None:
        """Unbatched ``[C, *s]`` input would put channels on the batch axis: refuse it."""
        if io.input0.dim() != module._get_no_batch_dim() + 1:
            raise NotImplementedError(
                f"{type(module).__name__}: unbatched input is not supported by "
                f"{request.name}; add a batch axis."
            )

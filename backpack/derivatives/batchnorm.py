"""``nn.BatchNorm1d/2d/3d`` in eval mode: ``out = xhat * w[c] + b[c]`` with channel axis 1 and
``xhat = (x - running_mean[c]) / sqrt(running_var[c] + eps)``, inputs ``[n, c]`` or ``[n, c, *s]``.

With batch statistics (training mode, or ``track_running_stats=False``) the samples are coupled
and every extension raises (see ``backpack.utils.errors``).
"""

from __future__ import annotations

from torch import Tensor, nn

from backpack.derivatives.base import IO, Rule, register
from backpack.utils.errors import batch_norm_raise_error_if_train


def _per_channel(t: Tensor, spatial_dims: int) -> Tensor:
    """View ``[c]`` as ``[c, 1, ...]`` to broadcast against ``[..., c, *s]``."""
    return t.view(-1, *[1] * spatial_dims)


@register(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
class BatchNormRule(Rule):
    """Jacobian products of BatchNorm with running statistics: a per-channel affine map."""

    needs_output = False

    def check(self, module: nn.modules.batchnorm._BatchNorm, io: IO, extension: object) -> None:
        """Batch statistics couple the samples: refuse every extension then."""
        batch_norm_raise_error_if_train(module, extension=extension)

    def _inv_std(self, module: nn.modules.batchnorm._BatchNorm) -> Tensor:
        """``1 / sqrt(running_var + eps)`` ``[c]``."""
        return (module.running_var + module.eps).rsqrt()

    def _scale(self, module: nn.modules.batchnorm._BatchNorm) -> Tensor:
        """``d out / d x`` per channel ``[c]``: ``w / sqrt(running_var + eps)``."""
        inv_std = self._inv_std(module)
        return inv_std if module.weight is None else module.weight * inv_std

    def jac_t_mat_prod(self, module: nn.Module, io: IO, mat: Tensor) -> Tensor:
        """``[v, n, c, *s] -> [v, n, c, *s]``: ``mat * scale[c]``."""
        return mat * _per_channel(self._scale(module), mat.dim() - 3)

    def jac_mat_prod(self, module: nn.Module, io: IO, mat: Tensor) -> Tensor:
        """``[v, n, c, *s] -> [v, n, c, *s]``: ``mat * scale[c]`` (the Jacobian is diagonal)."""
        return self.jac_t_mat_prod(module, io, mat)

    def param_jac_t_mat_prod(
        self, module: nn.Module, io: IO, mat: Tensor, name: str, sum_batch: bool = True
    ) -> Tensor:
        """``[v, n, c, *s] -> [v, (n,) c]``: ``sum_s mat * xhat`` (weight), ``sum_s mat`` (bias)."""
        if name == "weight":
            x = io.input0
            spatial = x.dim() - 2
            mean, inv_std = module.running_mean, self._inv_std(module)
            mat = mat * ((x - _per_channel(mean, spatial)) * _per_channel(inv_std, spatial))
        out = mat.flatten(3).sum(3) if mat.dim() > 3 else mat
        return out.sum(1) if sum_batch else out

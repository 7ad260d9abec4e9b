"""Pooling: average pools are linear ops; max pools route each output to its argmax input.

Max pools are piecewise linear: ``out[n, c, o] = x[n, c, idx[n, c, o]]`` with the argmax indices
``idx`` (flat over the spatial axes, as ``return_indices=True`` gives them), recomputed from the
stored input. ``J mat`` gathers at ``idx``, ``J^T mat`` scatter-adds there (windows may overlap).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import Module

import backpack._torch_private as _tp
from backpack.derivatives.base import IO, Rule
from backpack.derivatives.shape_ops import LinearOpRule
from backpack.registry import register
from backpack.utils import workspace


@register(
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)
class AvgPoolRule(LinearOpRule):
    """Average pools (any padding, ``ceil_mode``, ``count_include_pad``, divisor): linear ops."""


_MAX_POOL = {
    nn.MaxPool1d: (1, F.max_pool1d),
    nn.MaxPool2d: (2, F.max_pool2d),
    nn.MaxPool3d: (3, F.max_pool3d),
    nn.AdaptiveMaxPool1d: (1, F.adaptive_max_pool1d),
    nn.AdaptiveMaxPool2d: (2, F.adaptive_max_pool2d),
    nn.AdaptiveMaxPool3d: (3, F.adaptive_max_pool3d),
}


@register(*_MAX_POOL)
class MaxPoolRule(Rule):
    """``MaxPoolNd`` and ``AdaptiveMaxPoolNd``: ``out = x[idx]`` per sample and channel."""

    needs_output = False
    fresh_jac_t = True

    def on_forward(self, module: Module, io: IO, output: Tensor) -> None:
        """Keep the argmax autograd saved (2d/3d and adaptive 2d pooling save it)."""
        idx = _tp.saved_argmax(output.grad_fn)
        if idx is not None and idx.shape == output.shape:
            io.cache[("argmax",)] = idx

    def _indices(self, module: Module, io: IO) -> tuple[int, Tensor]:
        """Number of spatial axes and the argmax indices ``[n, c, *out_spatial]``."""
        dim, pool = _MAX_POOL[type(module)]
        if ("argmax",) not in io.cache:
            x = io.inputs[0]
            if isinstance(module, nn.modules.pooling._AdaptiveMaxPoolNd):
                _, idx = pool(x, module.output_size, return_indices=True)
            else:
                m = module
                _, idx = pool(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, True)
            io.cache[("argmax",)] = idx
        return dim, io.cache[("argmax",)]

    def jac_mat_prod(self, module: Module, io: IO, mat: Tensor) -> Tensor:
        """``[v, n, c, *in] -> [v, n, c, *out]``: gather ``mat`` at the argmax."""
        dim, idx = self._indices(module, io)
        flat = idx.flatten(-dim).expand(mat.shape[0], *idx.shape[:-dim], -1)
        return mat.flatten(-dim).gather(-1, flat).reshape(mat.shape[0], *idx.shape)

    def jac_t_mat_prod(self, module: Module, io: IO, mat: Tensor) -> Tensor:
        """``[v, n, c, *out] -> [v, n, c, *in]``: scatter-add ``mat`` to the argmax."""
        dim, idx = self._indices(module, io)
        flat = idx.flatten(-dim).expand(mat.shape[0], *idx.shape[:-dim], -1)
        shape = io.inputs[0].shape
        out = workspace.empty((mat.shape[0], *shape[:-dim], shape[-dim:].numel()), mat).zero_()
        out.scatter_add_(-1, flat, mat.flatten(-dim))
        return out.reshape(mat.shape[0], *shape)

"""Padding layers: linear ops (the constant of ``ConstantPadNd`` is an offset, not in ``J``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from backpack.derivatives.shape_ops import LinearOpRule
from backpack.registry import register


@register(
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ZeroPad3d,
    nn.ConstantPad1d,
    nn.ConstantPad2d,
    nn.ConstantPad3d,
)
class ConstantPadRule(LinearOpRule):
    """``ConstantPadNd`` / ``ZeroPadNd`` (negative padding crops): ``J`` pads with zeros."""

    def op(self, module: nn.modules.padding._ConstantPadNd, x: Tensor) -> Tensor:
        """Zero padding: the linear part of padding with ``module.value``."""
        return F.pad(x, module.padding, "constant", 0.0)


@register(
    nn.ReflectionPad1d,
    nn.ReflectionPad2d,
    nn.ReflectionPad3d,
    nn.ReplicationPad1d,
    nn.ReplicationPad2d,
    nn.ReplicationPad3d,
    nn.CircularPad1d,
    nn.CircularPad2d,
    nn.CircularPad3d,
)
class CopyPadRule(LinearOpRule):
    """Reflection, replication and circular padding: copies of input entries, linear ops."""

"""``nn.ConvTranspose{1,2,3}d``: the adjoint of a convolution in its input, plus a bias.

Its weight ``[i, o/g, *k]`` is contracted like a convolution's with the roles swapped: each
input position ``s`` meets the patch of the output-side matrix it is scattered to, so the
weight VJP is ``sum_s x[n, g, i, s] patches(mat)[n, g, (o, k), s]^T``.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.modules.conv import _ConvTransposeNd

from backpack.derivatives.base import IO
from backpack.derivatives.conv import ConvFamilyRule
from backpack.registry import register
from backpack.utils.conv import get_conv_function, get_conv_transpose_function, unfold


def _full_size_gap(module: _ConvTransposeNd, in_size, out_size) -> list[int]:
    """Output padding per dim: ``out`` minus the size the input alone determines."""
    return [
        o - ((i - 1) * s - 2 * p + d * (k - 1) + 1)
        for o, i, s, p, d, k in zip(
            out_size, in_size, module.stride, module.padding, module.dilation, module.kernel_size
        )
    ]


def _output_padding(module: _ConvTransposeNd, io: IO) -> tuple[int, ...]:
    """The forward's output padding, from its ``output_size`` argument where one was given."""
    size = io.kwargs.get("output_size") if io.kwargs else None
    if size is None and len(io.inputs) > 1:
        size = io.inputs[1]
    if size is None:
        return tuple(module.output_padding)
    dim = len(module.kernel_size)
    return tuple(_full_size_gap(module, io.input0.shape[2:], list(size)[-dim:]))


@register(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
class ConvTransposeRule(ConvFamilyRule):
    """Jacobian products of ``nn.ConvTransposeNd`` (``[n, i, *in] -> [n, o, *out]``).

    Weight ``[i, o/g, *k]``.
    """

    def jac_mat_prod(self, module: _ConvTransposeNd, io: IO, mat: Tensor) -> Tensor:
        """``[v, n, i, *in] -> [v, n, o, *out]``: the transposed convolution of ``mat``."""
        conv_t = get_conv_transpose_function(len(module.kernel_size))
        out = conv_t(
            mat.flatten(0, 1), module.weight, None, module.stride, module.padding,
            _output_padding(module, io), module.groups, module.dilation,
        )  # fmt: skip
        return out.reshape(*mat.shape[:2], *out.shape[1:])

    def jac_t_mat_prod(self, module: _ConvTransposeNd, io: IO, mat: Tensor) -> Tensor:
        """``[v, n, o, *out] -> [v, n, i, *in]``: the convolution of ``mat``, cropped.

        Output padding beyond the stride (possible with dilation) adds positions no input reaches.
        """
        conv = get_conv_function(len(module.kernel_size))
        g = conv(
            mat.flatten(0, 1), module.weight, None, module.stride, module.padding,
            module.dilation, module.groups,
        )  # fmt: skip
        g = g[(..., *(slice(0, t) for t in io.input0.shape[2:]))]
        return g.reshape(*mat.shape[:2], *g.shape[1:])

    def factors(self, module: _ConvTransposeNd, io: IO, mat: Tensor) -> tuple[Tensor, Tensor]:
        """``a``: patches of mat ``[v, n, g, o/g * prod(k), s]``, ``b``: x ``[1, n, g, i/g, s]``."""
        x = io.input0
        v, n, groups = mat.shape[0], mat.shape[1], module.groups
        gap = _full_size_gap(module, x.shape[2:], mat.shape[3:])
        # pad p left and p - gap right: exactly one patch per input position
        pairs = [(p, p - e) for p, e in zip(module.padding, gap)]
        patches = unfold(
            mat.flatten(0, 1), module.kernel_size, module.stride, module.dilation, pairs
        )
        a = patches.reshape(v, n, groups, -1, patches.shape[-1])
        b = x.reshape(1, n, groups, module.in_channels // groups, -1)
        return a, b

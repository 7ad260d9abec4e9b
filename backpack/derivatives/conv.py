"""``nn.Conv{1,2,3}d``: ``out[n, g, o, s] = sum_a W[g, o, a] patches(pad(x))[n, g, a, s] + b[o]``.

Patches (``a`` = input channel of the group x kernel offset) are the unfolded, padded input;
every padding mode and ``'same'``/``'valid'`` is resolved by ``backpack.utils.conv``.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from backpack.derivatives.base import IO, Request
from backpack.derivatives.linear_form import LinearFormRule
from backpack.registry import register
from backpack.utils import workspace
from backpack.utils.conv import (
    get_conv_function,
    get_conv_transpose_function,
    is_symmetric_zero,
    pad_adjoint,
    pad_input,
    padding_pairs,
    unfold_input,
)


class ConvFamilyRule(LinearFormRule):
    """What convolutions and transposed convolutions share: bias, batch checks."""

    def check(self, module: _ConvNd, io: IO, request: Request | None) -> None:
        dim = len(module.kernel_size)
        if io.input0.dim() != dim + 2:
            raise ValueError(
                f"{type(module).__name__}: {request.name} needs a batched input "
                f"[N, C, *spatial] ({dim + 2} dims), got shape {tuple(io.input0.shape)}. "
                "Add a batch axis (x.unsqueeze(0))."
            )

    def bias_jac_t(self, module: _ConvNd, mat: Tensor) -> Tensor:
        """``[v, n, o, *spatial] -> [v, n, o]``: sum over positions."""
        return mat.flatten(3).sum(3)


@register(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(ConvFamilyRule):
    """Jacobian products of ``nn.ConvNd`` (inputs ``[n, i, *in]``, outputs ``[n, o, *out]``)."""

    def jac_mat_prod(self, module: _ConvNd, io: IO, mat: Tensor) -> Tensor:
        """``[v, n, i, *in] -> [v, n, o, *out]``: the convolution of ``mat``, without bias."""
        m, pairs = pad_input(module, mat.flatten(0, 1))
        conv = get_conv_function(len(module.kernel_size))
        padding = tuple(left for left, _ in pairs)
        out = conv(m, module.weight, None, module.stride, padding, module.dilation, module.groups)
        return out.reshape(*mat.shape[:2], *out.shape[1:])

    def jac_t_mat_prod(self, module: _ConvNd, io: IO, mat: Tensor) -> Tensor:
        """``[v, n, o, *out] -> [v, n, i, *in]``: transposed convolution, padding adjoint.

        Symmetric zero padding is undone by the transposed convolution itself.
        """
        size = io.input0.shape[2:]
        pairs = padding_pairs(module)
        direct = is_symmetric_zero(module)
        padding = [left for left, _ in pairs] if direct else [0] * len(pairs)
        target = size if direct else [t + a + b for t, (a, b) in zip(size, pairs)]
        m = mat.flatten(0, 1)
        # output_padding restores the positions the forward's floor division dropped
        out_pad = [
            t - ((o - 1) * s - 2 * p + d * (k - 1) + 1)
            for t, o, s, p, d, k in zip(
                target, m.shape[2:], module.stride, padding, module.dilation, module.kernel_size
            )
        ]
        conv_t = get_conv_transpose_function(len(module.kernel_size))

        def transposed(part: Tensor) -> Tensor:
            return conv_t(
                part, module.weight, None, module.stride, tuple(padding), tuple(out_pad),
                module.groups, module.dilation,
            )  # fmt: skip

        g = workspace.chunked(transposed, m, (m.shape[0], module.in_channels, *target))
        if not direct:
            g = pad_adjoint(module, g, size)
        return g.reshape(*mat.shape[:2], *g.shape[1:])

    def factors(self, module: _ConvNd, io: IO, mat: Tensor) -> tuple[Tensor, Tensor]:
        """``a`` = patches ``[1, n, g, i/g * prod(k), s]``; ``b`` = mat ``[v, n, g, o/g, s]``."""
        key = ("unfolded_input",)
        if key not in io.cache:  # shared by all extensions and vectors of this backward
            io.cache[key] = unfold_input(module, io.input0)
        patches = io.cache[key]
        n, groups = patches.shape[0], module.groups
        a = patches.reshape(1, n, groups, -1, patches.shape[-1])
        b = mat.reshape(mat.shape[0], n, groups, module.out_channels // groups, -1)
        return a, b

"""Convolution helpers: resolved padding and unfolding (im2col) of 1d, 2d and 3d inputs.

``unfold`` builds the patches as a strided view (``Tensor.unfold``) followed by one copy; on CPU
this is several times faster than ``F.unfold`` and than a one-hot convolution, and it works
unchanged for any number of spatial dimensions.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from math import prod

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.conv import _ConvNd

from backpack.utils import workspace

Pairs = list[tuple[int, int]]  # (left, right) padding per spatial dim, in spatial order


def get_conv_function(dim: int) -> Callable:
    """``F.conv1d``, ``F.conv2d`` or ``F.conv3d`` for ``dim`` spatial dimensions."""
    return (F.conv1d, F.conv2d, F.conv3d)[dim - 1]


def get_conv_transpose_function(dim: int) -> Callable:
    """``F.conv_transpose{1,2,3}d`` for ``dim`` spatial dimensions."""
    return (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dim - 1]


def padding_pairs(module: _ConvNd) -> Pairs:
    """``(left, right)`` padding per spatial dim; ``'same'`` pads ``d(k-1)``, the odd one right."""
    if module.padding == "valid":
        return [(0, 0)] * len(module.kernel_size)
    if module.padding == "same":
        totals = [d * (k - 1) for k, d in zip(module.kernel_size, module.dilation)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(p, p) for p in module.padding]


def pad_arg(pairs: Pairs) -> list[int]:
    """``pairs`` in ``F.pad`` order (last spatial dim first)."""
    return [p for pair in reversed(pairs) for p in pair]


def is_symmetric_zero(module: _ConvNd) -> bool:
    """Whether the convolution itself can apply the padding (zeros, same on both sides)."""
    return module.padding_mode == "zeros" and all(a == b for a, b in padding_pairs(module))


def pad_mode(module: _ConvNd) -> str:
    """``F.pad`` mode of the module's ``padding_mode``."""
    return "constant" if module.padding_mode == "zeros" else module.padding_mode


def pad_input(module: _ConvNd, x: Tensor) -> tuple[Tensor, Pairs]:
    """``x`` with the module's padding applied by ``F.pad`` unless it is symmetric zeros.

    Returns the (possibly padded) input and the zero padding still to apply.

    Returns:
        The padded input and the zero padding per side still to apply.
    """
    pairs = padding_pairs(module)
    if is_symmetric_zero(module):
        return x, pairs
    return F.pad(x, pad_arg(pairs), mode=pad_mode(module)), [(0, 0)] * len(pairs)


def unfold(
    x: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    pairs: Pairs,
) -> Tensor:
    """Patches ``[n, c, *in] -> [n, c * prod(k), prod(out)]``, ordered like ``F.unfold``.

    ``pairs`` is zero padding per side (negative values crop).

    Returns:
        ``[n, c * prod(k), prod(out)]``.
    """
    if any(p != 0 for pair in pairs for p in pair):
        x = F.pad(x, pad_arg(pairs))
    dim = len(kernel_size)
    for i, (k, s, d) in enumerate(zip(kernel_size, stride, dilation)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)[..., ::d]  # appends a kernel axis
    n, c, positions = x.shape[0], x.shape[1], prod(x.shape[2 : 2 + dim])
    x = x.permute(0, 1, *range(2 + dim, 2 + 2 * dim), *range(2, 2 + dim))
    if not x.is_contiguous():  # the patches are the input itself for 1x1 kernels of stride 1
        x = workspace.empty(x.shape, x).copy_(x)
    return x.view(n, c * prod(kernel_size), positions)


def unfold_input(module: _ConvNd, x: Tensor) -> Tensor:
    """Patches of a ConvNd's input, padding mode included: ``[n, c_in * prod(k), prod(out)]``."""
    x, pairs = pad_input(module, x)
    return unfold(x, module.kernel_size, module.stride, module.dilation, pairs)


def unfolded_gram(a: Tensor) -> Tensor:
    """``sum_{n,s} a a^T`` ``[g, A, A]`` of patches ``a [n, g, A, s]``: one matmul over ``(n, s)``
    (a single copy puts them next to each other, for both operands).

    Returns:
        ``[g, A, A]``.
    """
    flat = a.permute(1, 2, 0, 3).flatten(2)  # [g, A, n s]
    return torch.bmm(flat, flat.transpose(1, 2))


def patch_gram(module: _ConvNd, x: Tensor, budget: int = 1 << 22) -> Tensor:
    """``sum_{n,s} a a^T`` ``[g, A, A]`` of a ConvNd's patches ``a [n, g, A, s]`` (``A = i/g *
    prod(k)``, ordered like ``unfold_input``), without unfolding when that is cheaper.

    Two kernel taps ``t, t'`` read flat positions ``p`` and ``p + d`` of the padded input,
    ``d = off(t') - off(t)``, so block ``(t, t')`` is ``sum_s M_d[base(s) + off(t)]`` with
    ``M_d[p] = sum_n x[n, :, p] x[n, :, p + d]^T``: one batched product per distinct offset
    ``d >= 0`` over all positions (``d < 0``: the transposed block), then the window sums. This
    costs ``#d P`` instead of ``prod(k)^2 S`` (``P`` padded input, ``S`` output positions)
    products of channel pairs; position chunks keep ``M_d`` within ``budget`` elements.

    Returns:
        ``[g, A, A]``.
    """
    groups, ks = module.groups, module.kernel_size
    xp, pairs = pad_input(module, x)
    if any(p != 0 for pair in pairs for p in pair):
        xp = F.pad(xp, pad_arg(pairs))
    n, c, size = xp.shape[0], xp.shape[1], xp.shape[2:]
    flat = [prod(size[i + 1 :]) for i in range(len(size))]  # flat stride per spatial dim
    out = [
        (m - d * (k - 1) - 1) // s + 1
        for m, k, s, d in zip(size, ks, module.stride, module.dilation)
    ]
    taps = torch.tensor(
        [
            sum(d * t * f for t, d, f in zip(tap, module.dilation, flat))
            for tap in itertools.product(*map(range, ks))
        ]
    )
    base = torch.tensor(
        [
            sum(s * o * f for o, s, f in zip(pos, module.stride, flat))
            for pos in itertools.product(*map(range, out))
        ]
    )
    offsets = taps[None, :] - taps[:, None]  # d of tap pair (t, t')
    distinct = offsets.unique()
    positions, num_taps = prod(size), len(taps)
    if (distinct >= 0).sum() * positions > num_taps**2 * len(base) / 2:
        a = unfold_input(module, x)
        return unfolded_gram(a.reshape(n, groups, -1, a.shape[-1]))
    cg = c // groups
    xs = xp.reshape(n, groups, cg, positions).permute(3, 1, 2, 0).contiguous()  # [P, g, cg, n]
    blocks = x.new_empty(num_taps, num_taps, groups, cg, cg)
    step = max(1, budget // (groups * cg * cg))
    for d in distinct[distinct >= 0].tolist():
        t, t2 = (offsets == d).nonzero(as_tuple=True)
        where = taps[t][:, None] + base[None, :]  # [pairs, S]: the positions each pair sums
        select = x.new_zeros(len(t), positions - d).scatter_(1, where.to(x.device), 1.0)
        sums = 0
        for i in range(0, positions - d, step):
            j = min(i + step, positions - d)
            m_d = torch.matmul(xs[i:j], xs[i + d : j + d].transpose(-1, -2))  # [p, g, cg, cg]
            sums = sums + select[:, i:j] @ m_d.flatten(1)
        sums = sums.view(len(t), groups, cg, cg)
        blocks[t, t2] = sums
        blocks[t2, t] = sums.transpose(-1, -2)
    return blocks.permute(2, 3, 0, 4, 1).reshape(groups, cg * num_taps, cg * num_taps)


def pad_adjoint(module: _ConvNd, g: Tensor, size: Sequence[int]) -> Tensor:
    """Adjoint of the module's padding: ``[b, c, *padded] -> [b, c, *size]``."""
    pad, mode = pad_arg(padding_pairs(module)), pad_mode(module)
    primal = g.new_zeros(()).expand(*g.shape[:2], *size)  # F.pad is linear: any point will do
    _, pull = torch.func.vjp(lambda t: F.pad(t, pad, mode=mode), primal)
    return pull(g)[0]

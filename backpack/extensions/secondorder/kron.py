"""Kronecker factors ``[G, A]`` of the curvature of linear-form layers (Linear, ConvNd,
ConvTransposeNd): the machinery behind KFAC, KFLR and KFRA (``secondorder.hbp``).

Layout (row-major vec, as ``backpack.utils.kroneckers.kfacs_to_mat``): weight -> ``[G, A]`` with
``G ⊗ A`` approximating the weight's curvature block, bias -> ``[G]``. Linear ``[o, i]``: ``G
[o, o]``, ``A [i, i]``; ConvNd ``[o, i, *k]``: ``G [o, o]``, ``A [i k, i k]``; ConvTransposeNd:
the factors of ``weight.transpose(0, 1)`` ``[o, i, *k]`` (a UserWarning says so on every call).
Groups ``g > 1``: the factors of the equivalent dense weight ``[o, i, *k]`` (zero outside the
group blocks), ``G = blockdiag(G_1..G_g)``, ``A = blockdiag(A_1..A_g)``: restricted to the entries
the grouped weight has, ``G ⊗ A = blockdiag_g(G_g ⊗ A_g)``, and damped inverses of the factors
keep that structure.

Scale: ``b`` is what flows to the layer's output (square-root factor, carrying the reduction's
``1/sqrt(normaliser)``), ``a`` the input-side patches at the output positions ``s``:
``G_g = sum_{v,n} (sum_s b)(sum_s b)^T`` (conv: summed over positions before the outer product,
as BackPACK; the KFC paper differs by the number of positions), ``A = (1/N) sum_{n,s} a a^T``.
The bias's ``[G]`` is ``sum_{v,n} (sum_s b)(sum_s b)^T`` over all channels, its exact GGN block.
Linear inputs with extra dims ``[N, *, i]`` (``S`` positions), ``kfac_approx``:
    ``"expand"`` (default): positions are extra samples, ``G = sum_{v,n,s} b b^T``,
        ``A = 1/(N S) sum_{n,s} a a^T`` (exact on deep linear nets whose loss treats every
        position separately);
    ``"reduce"``: ``G = sum_{v,n} (sum_s b)(sum_s b)^T``, ``A = (1/N) sum_n abar abar^T`` with
        ``abar = mean_s a`` (exact where the positions are pooled before the loss).
KFRA replaces ``sum_{v,n} b b^T`` by the backpropagated dense ``[D, D]`` block (``DenseStream``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from backpack.derivatives.base import chunks
from backpack.derivatives.conv import ConvFamilyRule
from backpack.derivatives.conv_transpose import ConvTransposeRule, _full_size_gap
from backpack.derivatives.linear_form import LinearFormRule
from backpack.extensions.base import Call
from backpack.extensions.secondorder.base import SecondOrderExtension
from backpack.utils.conv import get_conv_transpose_function

KFAC_APPROX = ("expand", "reduce")


@dataclass(frozen=True)
class DenseStream:
    """A dense ``[D, D]`` curvature over the flattened activation of one sample, batch-averaged.

    Starts at a loss as ``sum_n S_n S_n^T`` (the summed per-sample loss Hessians over the
    normaliser) and passes a module as ``(1/N) sum_n J_n^T G J_n``, for any rule with
    ``jac_t_mat_prod``; contributions along several paths (and of several losses) add.
    """

    def start(self, call: Call, scale: float) -> Tensor:
        root = call.rule.sqrt_hessian(call.module, call.io).flatten(2)
        return torch.einsum("cnd,cne->de", root, root) * scale

    def propagate(self, call: Call, dense: Tensor) -> list[Tensor | None]:
        """``(1/N) sum_n J_n^T G J_n`` per input: ``J^T`` on G's columns per sample, transpose,
        again."""
        rule, module, g = call.rule, call.module, call.grads[0]
        n, out, d = g.shape[0], g.shape[1:], dense.shape[0]

        def jac_t(io: Any, mat: Tensor) -> tuple:
            res = rule.jac_t_mat_prod(module, io, mat)
            return res if isinstance(res, tuple) else (res,)

        totals: list = []
        for idx in chunks(n, d * (d + call.io.input0[0].numel())):
            io = call.io
            if idx != slice(0, n):
                io, _ = rule.subsample(module, io, g, list(range(n))[idx])
            m = idx.stop - idx.start
            cols = dense.reshape(d, 1, *out).expand(d, m, *out).contiguous()
            for i, left in enumerate(jac_t(io, cols)):  # [d, n, *in_i] = J_i^T G
                if left is None:
                    block = None
                else:
                    left = left.reshape(d, m, -1)
                    d_in = left.shape[-1]
                    right = left.permute(2, 1, 0).reshape(d_in, m, *out)  # columns of G J_i
                    block = jac_t(io, right)[i].reshape(d_in, m, d_in).sum(1)
                if len(totals) <= i:
                    totals.append(block)
                elif block is not None:
                    totals[i] = totals[i] + block
        return [None if t is None else t.T / n for t in totals]

    @staticmethod
    def accumulate(old: Tensor, new: Tensor) -> Tensor:
        return old + new


def _group_blocks(mat: Tensor, groups: int) -> Tensor:
    """Diagonal blocks ``[g, B, B]`` of a ``[g B, g B]`` matrix."""
    b = mat.shape[0] // groups
    return mat.reshape(groups, b, groups, b).diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()


def _blockdiag(blocks: Tensor) -> Tensor:
    return torch.block_diag(*blocks) if blocks.shape[0] > 1 else blocks[0]


def transposed_patches(module: Any, x: Tensor, out_size: Any) -> Tensor:
    """``[n, g, i/g * prod(k), T]``: the input entry each output position ``T`` of a transposed
    convolution reads per (input channel, kernel offset), by a transposed conv with a one-hot
    kernel; the weight of ``weight.transpose(0, 1)`` acts on these like a convolution's."""
    ks = module.kernel_size
    k = math.prod(ks)
    eye = torch.eye(k, dtype=x.dtype, device=x.device).reshape(1, k, *ks)
    gap = _full_size_gap(module, x.shape[2:], out_size)
    conv_t = get_conv_transpose_function(len(ks))
    flat = x.flatten(0, 1).unsqueeze(1)
    out = conv_t(flat, eye, None, module.stride, module.padding, gap, 1, module.dilation)
    return out.reshape(x.shape[0], module.groups, -1, out[0, 0].numel())


class KroneckerExtension(SecondOrderExtension):
    """Stores ``[G, A]`` per weight and ``[G]`` per bias of linear-form layers.

    Args:
        savefield: attribute on the parameters.
        stream: ``Stream`` (square-root factors: KFAC, KFLR) or ``DenseStream`` (KFRA).
        kfac_approx: ``"expand"`` or ``"reduce"``, for Linear inputs with extra dims.
    """

    def __init__(self, savefield: str, stream: Any, kfac_approx: str = "expand"):
        if kfac_approx not in KFAC_APPROX:
            raise ValueError(f"kfac_approx must be one of {KFAC_APPROX}, got {kfac_approx!r}")
        super().__init__(savefield)
        self.stream = stream
        self.kfac_approx = kfac_approx

    def store(self, call: Call, flowing: Any) -> None:
        params = call.params()
        if not params:
            return
        if not isinstance(call.rule, LinearFormRule):
            raise NotImplementedError(
                f"{type(self).__name__}: no Kronecker factorisation for {call.module} (parameters "
                f"{[n for n, _ in params]}): only Linear, ConvNd and ConvTransposeNd weights act "
                "as a matrix on input patches. Freeze these parameters (requires_grad=False) or "
                "use a diagonal extension (DiagGGNExact) for them."
            )
        call.rule.check(call.module, call.io, self)
        if isinstance(call.rule, ConvTransposeRule):
            warnings.warn(
                f"{type(self).__name__}: the Kronecker factors of {call.module} approximate the "
                "curvature of weight.transpose(0, 1) [out, in/groups, *kernel], not of weight.",
                UserWarning,
                stacklevel=2,
            )
        mode = "conv" if isinstance(call.rule, ConvFamilyRule) else self.kfac_approx
        bias_g = self._bias_g(call, flowing)
        for name, param in params:
            if name == "bias":
                setattr(param, self.savefield, [bias_g])
                continue
            groups = getattr(call.module, "groups", 1)
            if mode == "expand":
                g_blocks = self._expand_g(call, flowing)
            else:
                g_blocks = _group_blocks(bias_g, groups)
            setattr(param, self.savefield, [_blockdiag(g_blocks), _blockdiag(_a(call, mode))])

    def _bias_g(self, call: Call, flowing: Any) -> Tensor:
        """``sum_{v,n} (sum_s b)(sum_s b)^T`` ``[o, o]``."""
        bias_jac_t = call.rule.bias_jac_t
        if isinstance(self.stream, DenseStream):  # sum both sides of G over the positions
            out = call.grads[0].shape[1:]
            half = bias_jac_t(call.module, flowing.reshape(-1, 1, *out))[:, 0]
            return bias_jac_t(call.module, half.T.reshape(-1, 1, *out))[:, 0].T
        g = 0
        for sign, mat in flowing.values():
            col = bias_jac_t(call.module, mat).flatten(0, 1)
            g = g + sign * col.T @ col
        return g

    def _expand_g(self, call: Call, flowing: Any) -> Tensor:
        """``sum_{v,n,s} b b^T`` ``[g, B, B]``, positions as samples."""
        factors, module, io = call.rule.factors, call.module, call.io
        if isinstance(self.stream, DenseStream):  # G[(g,b,s), (g',c,s')] in the rule's layout
            d, out = flowing.shape[0], call.grads[0].shape[1:]
            half = factors(module, io, flowing.reshape(d, 1, *out))[1].reshape(d, -1)
            full = factors(module, io, half.T.reshape(-1, 1, *out))[1]
            groups, dim_b, s = full.shape[2:]
            full = full.reshape(groups, dim_b, s, groups, dim_b, s).diagonal(dim1=0, dim2=3)
            return torch.einsum("bscsg->gbc", full)
        g = 0
        for sign, mat in flowing.values():
            b = factors(module, io, mat)[1]
            g = g + sign * torch.einsum("vngbs,vngcs->gbc", b, b)
        return g


def _a(call: Call, mode: str) -> Tensor:
    """``A`` ``[g, A, A]`` of the input-side patches, shared by all Kronecker extensions."""
    key = ("kron_A", mode)
    if key not in call.io.cache:
        g = call.grads[0]
        if isinstance(call.rule, ConvTransposeRule):
            a = transposed_patches(call.module, call.io.input0, g.shape[2:])
        else:
            a = call.rule.factors(call.module, call.io, g.unsqueeze(0))[0][0]
        scale = 1.0 / a.shape[0]
        if mode == "reduce":
            a = a.mean(-1, keepdim=True)
        elif mode == "expand":
            scale /= a.shape[-1]
        flat = a.permute(1, 2, 0, 3).flatten(2)  # [g, A, n s], one copy for both operands
        call.io.cache[key] = torch.bmm(flat, flat.transpose(1, 2)) * scale
    return call.io.cache[key]

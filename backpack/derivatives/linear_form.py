"""The linear-form family: Linear, ConvNd and ConvTransposeNd.

Each such layer's weight enters as ``sum_s b[n, g, :, s] a[n, g, :, s]^T`` over shared positions
``s``: for Linear ``a`` is the input and ``b`` the output-side matrix (positions: extra dims);
for convolutions ``a`` is the unfolded input (patches); for transposed convolutions the roles swap
(``a`` is the unfolded output-side matrix, ``b`` the input). From these two factors alone follow the
per-sample weight gradients, their squared norms without materialising them (a Gram contraction
over positions), the sum of squared gradients and, later, the Kronecker factors.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import Module

from backpack.derivatives.base import IO, Rule, chunks


class LinearFormRule(Rule):
    """Rule for layers whose weight acts as a (grouped) matrix on patches of the input."""

    needs_output = False

    def factors(self, module: Module, io: IO, mat: Tensor) -> tuple[Tensor, Tensor]:
        """``(a [v|1, n, g, A, s], b [v|1, n, g, B, s])`` with weight vjp ``sum_s b a^T``."""
        raise NotImplementedError

    def bias_jac_t(self, module: Module, mat: Tensor) -> Tensor:
        """``[v, n, *out] -> [v, n, o]``: sum of ``mat`` over the shared positions."""
        raise NotImplementedError

    def param_jac_t_mat_prod(
        self, module: Module, io: IO, mat: Tensor, name: str, sum_batch: bool = True
    ) -> Tensor:
        """``[v, n, *out] -> [v, (n,) *param]``."""
        if name == "bias":
            out = self.bias_jac_t(module, mat)
            return out.sum(1) if sum_batch else out
        a, b = self.factors(module, io, mat)
        eq = "vngbs,vngas->vgba" if sum_batch else "vngbs,vngas->vngba"
        v = max(a.shape[0], b.shape[0])
        out = torch.einsum(eq, b.expand(v, *b.shape[1:]), a.expand(v, *a.shape[1:]))
        return out.reshape(*out.shape[: 1 if sum_batch else 2], *module.weight.shape)

    def _factors1(self, module: Module, io: IO, g: Tensor) -> tuple[Tensor, Tensor]:
        """Factors for a single gradient ``g`` ``[n, *out]``, without the vector axis."""
        key = ("factors",)
        if key not in io.cache:
            a, b = self.factors(module, io, g.unsqueeze(0))
            io.cache[key] = (a[0], b[0])
        return io.cache[key]

    def batch_l2(self, module: Module, io: IO, g: Tensor, name: str) -> Tensor:
        """``||sum_s b_s a_s^T||^2`` per sample, by a Gram contraction over positions if cheaper."""
        if name == "bias" or ("batch_grad", name) in io.cache:
            return super().batch_l2(module, io, g, name)
        a, b = self._factors1(module, io, g)
        n, groups, dim_a, s = a.shape
        dim_b = b.shape[2]
        if s * s * (dim_a + dim_b) < s * dim_a * dim_b:
            gram_a = torch.einsum("ngas,ngat->ngst", a, a)
            gram_b = torch.einsum("ngbs,ngbt->ngst", b, b)
            return (gram_a * gram_b).flatten(1).sum(1)
        return super().batch_l2(module, io, g, name)

    def sum_grad_squared(self, module: Module, io: IO, g: Tensor, name: str) -> Tensor:
        """``sum_n (sum_s b a^T)^2``: the diagonal below with the gradient as only column."""
        if ("batch_grad", name) in io.cache:
            return super().sum_grad_squared(module, io, g, name)
        return self.param_diag(module, io, g.unsqueeze(0), name)

    def param_diag(
        self, module: Module, io: IO, mat: Tensor, name: str, sum_batch: bool = True
    ) -> Tensor:
        """``sum_v (sum_s b_v a_v^T)^2`` ``[v, n, *out] -> [(n,) *param]``.

        One position: ``sum_v b_v^2 a_v^2`` without per-sample matrices; else in batch chunks.
        """
        if name == "bias":
            out = self.bias_jac_t(module, mat).square().sum(0)
            return out.sum(0) if sum_batch else out
        a, b = self.factors(module, io, mat)
        v = max(a.shape[0], b.shape[0])
        a, b = a.expand(v, *a.shape[1:]), b.expand(v, *b.shape[1:])
        lead = () if sum_batch else (a.shape[1],)
        if a.shape[-1] == 1:
            eq = "vngb,vnga->gba" if sum_batch else "vngb,vnga->ngba"
            out = torch.einsum(eq, b[..., 0].square(), a[..., 0].square())
            return out.reshape(*lead, *module.weight.shape)
        _, n, groups, dim_a, _ = a.shape
        parts = [
            torch.einsum("vngbs,vngas->vngba", b[:, idx], a[:, idx]).square().sum(0)
            for idx in chunks(n, v * groups * dim_a * b.shape[3])
        ]
        out = sum(p.sum(0) for p in parts) if sum_batch else torch.cat(parts)
        return out.reshape(*lead, *module.weight.shape)

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
from torch.func import functional_call
from torch.nn import Module

from backpack.derivatives.base import IO, Rule, chunks


class LinearFormRule(Rule):
    """Rule for layers whose weight acts as a (grouped) matrix on patches of the input."""

    needs_output = False
    fresh_jac_t = True

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

    def param_jac_mat_prod(self, module: Module, io: IO, mat: Tensor, name: str) -> Tensor:
        """``J_theta mat``: ``[v, *param] -> [v, n, *out]``. The layer is linear in its parameters
        jointly, so this is the layer itself with ``theta = mat`` and its other parameters zero."""
        zeros = {k: torch.zeros_like(p) for k, p in module.named_parameters(recurse=False)}

        def layer(p: Tensor) -> Tensor:
            return functional_call(module, {**zeros, name: p}, io.inputs, io.kwargs)

        with torch.no_grad():  # no graph, and the forward hook records nothing without grad
            return torch.func.vmap(layer)(mat)

    def _factors1(self, module: Module, io: IO, g: Tensor) -> tuple[Tensor, Tensor]:
        """Factors for a single gradient ``g`` ``[n, *out]``, without the vector axis."""
        key = ("factors",)
        if key not in io.cache:
            a, b = self.factors(module, io, g.unsqueeze(0))
            io.cache[key] = (a[0], b[0])
        return io.cache[key]

    def _batch_grad_chunks(self, module: Module, io: IO, g: Tensor):
        """Per-sample weight gradients ``[n', g, B, A]`` in batch chunks of bounded memory."""
        a, b = self._factors1(module, io, g)
        n, groups, dim_a, _ = a.shape
        for idx in chunks(n, groups * dim_a * b.shape[2], budget=1 << 20):
            yield torch.einsum("ngbs,ngas->ngba", b[idx], a[idx])

    def batch_grad(
        self, module: Module, io: IO, g: Tensor, name: str, out: Tensor | None = None
    ) -> Tensor:
        """``sum_s b a^T`` per sample ``[n, *weight]``, one batched matmul (into ``out``)."""
        key = ("batch_grad", name)
        if name == "bias" or key in io.cache:
            return super().batch_grad(module, io, g, name)
        a, b = self._factors1(module, io, g)
        n, groups, dim_a, _ = a.shape
        if torch.is_grad_enabled():  # backward(create_graph=True): part of the graph, no out=
            out = torch.matmul(b, a.transpose(-1, -2)).view(n, *module.weight.shape)
        else:  # a base tensor, which the next pass may reuse as ``out``
            out = a.new_empty(n, *module.weight.shape) if out is None else out
            torch.matmul(b, a.transpose(-1, -2), out=out.view(n, groups, b.shape[2], dim_a))
        io.cache[key] = out
        return out

    def grad(self, module: Module, io: IO, g: Tensor, name: str) -> Tensor:
        key = ("grad", name)  # left by sum_grad_squared (Variance needs both)
        return io.cache[key] if key in io.cache else super().grad(module, io, g, name)

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
        parts = self._batch_grad_chunks(module, io, g)
        return torch.cat([part.square_().flatten(1).sum(1) for part in parts])

    def sum_grad_squared(self, module: Module, io: IO, g: Tensor, name: str) -> Tensor:
        """``sum_n (sum_s b a^T)^2``; one position: ``sum_n b^2 a^T^2``; else batch chunks."""
        if name == "bias" or ("batch_grad", name) in io.cache:
            return super().sum_grad_squared(module, io, g, name)
        a, b = self._factors1(module, io, g)
        if a.shape[-1] == 1:
            out = torch.einsum("ngb,nga->gba", b[..., 0].square(), a[..., 0].square())
            return out.reshape(module.weight.shape)
        total, out = 0, 0
        for part in self._batch_grad_chunks(module, io, g):
            total = total + part.sum(0)
            out = out + part.square_().sum(0)
        io.cache[("grad", name)] = total.reshape(module.weight.shape)
        return out.reshape(module.weight.shape)

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
        lead = () if sum_batch else (a.shape[1],)
        if a.shape[-1] == 1:  # sum_v b_v^2 a_v^2; a factor shared over v is squared once
            a2, b2 = a[..., 0].square(), b[..., 0].square()
            if a.shape[0] == 1:
                b2 = b2.sum(0, keepdim=True)
            elif b.shape[0] == 1:
                a2 = a2.sum(0, keepdim=True)
            eq = "vngb,vnga->gba" if sum_batch else "vngb,vnga->ngba"
            return torch.einsum(eq, b2, a2).reshape(*lead, *module.weight.shape)
        v = max(a.shape[0], b.shape[0])
        a, b = a.expand(v, *a.shape[1:]), b.expand(v, *b.shape[1:])
        return self._sum_v_squared(a, b, sum_batch).reshape(*lead, *module.weight.shape)

    @staticmethod
    def _sum_v_squared(a: Tensor, b: Tensor, sum_batch: bool) -> Tensor:
        """``sum_v (sum_s b_v a_v^T)^2`` ``[(n,) g, B, A]`` in batch chunks.

        A factor shared over ``v`` (stride 0, as the input of a conv) is not copied ``v`` times:
        per chunk of samples, one batched matmul ``a b_v^T`` per ``v`` on contiguous slices of
        the other factor, squared into one accumulator; each product is cache-sized (a matmul
        over all ``v`` at once would first permute ``v`` next to the features, a copy of the
        whole factor).
        """
        swap = a.stride(0) != 0 and b.stride(0) == 0  # make ``a`` the shared one
        if swap:
            a, b = b, a
        v, n, groups, dim_a, s = a.shape
        dim_b = b.shape[3]
        parts, total = [], None
        shared = a.stride(0) == 0 or v == 1  # one matmul per v on the shared (or only) a
        per_sample = (1 if shared else v) * groups * dim_a * dim_b
        for idx in chunks(n, per_sample, budget=1 << 20):
            if shared:
                a_n = a[0, idx]
                js = torch.matmul(a_n, b[0, idx].transpose(-1, -2)).square_()
                for j in range(1, v):
                    prod = torch.matmul(a_n, b[j, idx].transpose(-1, -2))
                    js.addcmul_(prod, prod)
            else:
                js = torch.einsum("vngas,vngbs->ngvab", a[:, idx], b[:, idx]).square_().sum(2)
            if not sum_batch:
                parts.append(js)
                continue
            js = js.sum(0) if js.shape[0] > 1 else js[0]  # js is fresh: accumulate in place
            total = js if total is None else total.add_(js)
        out = total if sum_batch else torch.cat(parts)
        return out if swap else out.transpose(-1, -2)

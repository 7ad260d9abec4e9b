"""``PositionalEmbedding``: ``out[n, l] = x[n, l] + W[l]``, the identity in ``x`` and a shift by
rows of ``W`` (rows beyond the sequence length ``L`` get no gradient)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from backpack.custom_module.position import PositionalEmbedding
from backpack.derivatives.base import IO, Rule
from backpack.registry import register


@register(PositionalEmbedding)
class PositionalEmbeddingRule(Rule):
    """``J_x = I``; ``J_W`` copies ``W[:L]`` to every sample; the output is linear in both."""

    needs_output = False

    def jac_t_mat_prod(self, module: PositionalEmbedding, io: IO, mat: Tensor) -> Tensor:
        return mat

    def jac_mat_prod(self, module: PositionalEmbedding, io: IO, mat: Tensor) -> Tensor:
        return mat

    def param_jac_t_mat_prod(
        self, module: PositionalEmbedding, io: IO, mat: Tensor, name: str, sum_batch: bool = True
    ) -> Tensor:
        """``[v, n, L, *feat] -> [v, (n,) P, *feat]``: ``mat`` at rows ``:L``, zero beyond."""
        if sum_batch:
            mat = mat.sum(1)
        rows = module.weight.shape[0] - mat.shape[-module.weight.dim()]
        pad = [0, 0] * (module.weight.dim() - 1) + [0, rows]
        return F.pad(mat, pad) if rows else mat

    def param_jac_mat_prod(
        self, module: PositionalEmbedding, io: IO, mat: Tensor, name: str
    ) -> Tensor:
        """``[v, P, *feat] -> [v, n, L, *feat]``: rows ``:L`` of ``mat`` for every sample."""
        x = io.input0
        return mat[:, None, : x.shape[1]].expand(mat.shape[0], *x.shape)

    kron_input_rows = True  # W [P, *feat]: rows are positions, the input side

    def kron_factors(
        self, module: PositionalEmbedding, io: IO, mat: Tensor, name: str
    ) -> list[tuple[Tensor, Tensor]]:
        """The layer reads row ``l`` at position ``l``, an Embedding of ``arange(L)``: one
        Kronecker block ``(a [1, n, 1, P, L], b [v, n, 1, F, L])``, ``a`` the one-hot rows,
        ``b`` ``mat`` with the features flattened."""
        x = io.input0
        n, length, rows = x.shape[0], x.shape[1], module.weight.shape[0]
        eye = torch.eye(rows, length, dtype=mat.dtype, device=mat.device)
        b = mat.flatten(3).transpose(2, 3)[:, :, None]
        return [(eye.expand(1, n, 1, rows, length), b)]

"""``PositionalEmbedding``: ``out[n, l] = x[n, l] + W[l]``, the identity in ``x`` and a shift by
rows of ``W`` (rows beyond the sequence length ``L`` get no gradient)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from backpack.custom_module.position import PositionalEmbedding
from backpack.derivatives.base import IO, Rule, register


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

"""``nn.Embedding``: ``out[n, t, :] = W[x[n, t], :]`` over the positions ``t`` of an index input
``x`` ``[n, *]`` (``W`` ``[V, D]``).

The weight gradient scatters each position's output gradient to its row. ``padding_idx`` rows get
none, ``scale_grad_by_freq`` divides each position by its index's count over the whole mini-batch
(as PyTorch does; per-sample gradients are each sample's term of that sum). ``max_norm`` rescales
rows in the forward pass without a gradient, so it changes nothing here; ``sparse=True`` only
changes the layout of ``W.grad`` (the quantities here are dense).

Squared norms and second moments never build ``[n, V, D]``: positions are summed per
(sample, index) pair first, which leaves at most ``n * positions`` rows.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from backpack.derivatives.base import IO, Rule, register


@register(nn.Embedding)
class EmbeddingRule(Rule):
    """Per-sample weight gradients of ``nn.Embedding`` by batched scatters (``index_add``)."""

    needs_output = False

    def jac_t_mat_prod(self, module: nn.Embedding, io: IO, mat: Tensor) -> Tensor:
        """Undefined: the input is integer indices."""
        raise NotImplementedError(
            f"{module}: the input of nn.Embedding holds integer indices, which have no gradient; "
            "nothing is backpropagated past an Embedding. Make it the first layer of the model."
        )

    jac_mat_prod = jac_t_mat_prod

    def _weighted(self, module: nn.Embedding, io: IO, mat: Tensor) -> Tensor:
        """``mat`` ``[..., n, *, D]`` times each position's factor (see ``_weights``)."""
        weights = self._weights(module, io)
        return mat if weights is None else mat * weights.unsqueeze(-1)

    def _weights(self, module: nn.Embedding, io: IO) -> Tensor | None:
        """Factor per position ``[n, *]``: 0 at ``padding_idx``, else ``1/count`` of its index
        over the batch if ``scale_grad_by_freq``, else 1. None where all are 1.
        """
        if "weights" not in io.cache:
            x, w = io.input0, None
            if module.scale_grad_by_freq:
                _, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
                w = counts.to(module.weight.dtype).reciprocal()[inverse]
            if module.padding_idx is not None:
                keep = (x != module.padding_idx).to(module.weight.dtype)
                w = keep if w is None else w * keep
            io.cache["weights"] = w
        return io.cache["weights"]

    def subsample(
        self, module: nn.Embedding, io: IO, g: Tensor, idx: list[int]
    ) -> tuple[IO, Tensor]:
        """Restrict to samples ``idx``, keeping the full-batch index counts of each position."""
        weights = self._weights(module, io)
        sub, g_sub = super().subsample(module, io, g, idx)
        if weights is not None:
            weights = weights.index_select(0, torch.tensor(idx, device=weights.device))
        sub.cache["weights"] = weights
        return sub, g_sub

    def _keys(self, module: nn.Embedding, x: Tensor, groups: Tensor) -> Tensor:
        """Flat row ``group * V + index`` of every position ``[...]``; ``groups`` broadcasts
        against ``x`` reshaped to ``[n, positions]``.
        """
        return (groups * module.num_embeddings + x.reshape(x.shape[0], -1)).flatten()

    def _scatter(self, module: nn.Embedding, io: IO, mat: Tensor, per_sample: bool) -> Tensor:
        """``[v, n, *, D] -> [v, (n,) V, D]``: one ``index_add`` of the weighted rows of ``mat``."""
        x, mat = io.input0, self._weighted(module, io, mat)
        v, n, dim = mat.shape[0], mat.shape[1], mat.shape[-1]
        groups = v * n if per_sample else v
        group = torch.arange(groups, device=x.device).view(v, n if per_sample else 1, 1)
        out = mat.new_zeros(groups * module.num_embeddings, dim)
        out.index_add_(0, self._keys(module, x, group), mat.reshape(-1, dim))
        return out.view(v, *([n] if per_sample else []), module.num_embeddings, dim)

    def param_jac_t_mat_prod(
        self, module: nn.Embedding, io: IO, mat: Tensor, name: str, sum_batch: bool = True
    ) -> Tensor:
        """``[v, n, *, D] -> [v, (n,) V, D]``."""
        return self._scatter(module, io, mat, per_sample=not sum_batch)

    def _segments(self, module: nn.Embedding, io: IO, g: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample gradient rows that can be nonzero: ``(sample * V + index)`` ``[u]`` and
        the rows ``[u, D]``, summing the positions of each (sample, index) pair.
        """
        if "segments" not in io.cache:
            x, g = io.input0, self._weighted(module, io, g)
            sample = torch.arange(x.shape[0], device=x.device).view(-1, 1)
            uniq, inverse = torch.unique(self._keys(module, x, sample), return_inverse=True)
            rows = g.new_zeros(uniq.numel(), g.shape[-1])
            io.cache["segments"] = uniq, rows.index_add_(0, inverse, g.reshape(-1, g.shape[-1]))
        return io.cache["segments"]

    def batch_l2(self, module: nn.Embedding, io: IO, g: Tensor, name: str) -> Tensor:
        """``[n]``: squared norms of the per-(sample, index) rows, summed per sample."""
        keys, rows = self._segments(module, io, g)
        out = rows.new_zeros(io.input0.shape[0])
        return out.index_add_(0, keys // module.num_embeddings, rows.square().sum(1))

    def sum_grad_squared(self, module: nn.Embedding, io: IO, g: Tensor, name: str) -> Tensor:
        """``[V, D]``: squared per-(sample, index) rows, summed per index."""
        keys, rows = self._segments(module, io, g)
        out = rows.new_zeros(module.weight.shape)
        return out.index_add_(0, keys % module.num_embeddings, rows.square())

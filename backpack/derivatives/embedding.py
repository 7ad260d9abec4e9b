"""``nn.Embedding`` and ``nn.EmbeddingBag``: outputs read rows of the weight ``W`` ``[V, D]``.

Both are described by *slots*: per sample, ``K`` reads of a row of the weight (flattened to
``[R, d]``), each scaled by a factor. The weight's vjp scatters each slot's share of the output
gradient to its row (one ``index_add``); squared norms, second moments and GGN diagonals sum the
slots of each (vector, sample, row) first, so they never build ``[v, n, V, D]``.

Embedding (input ``x`` ``[n, *]``): a slot per position, ``R, d = V, D``. ``padding_idx`` rows get
no gradient, ``scale_grad_by_freq`` divides each position by its index's count over the whole
mini-batch (as PyTorch does; per-sample gradients are each sample's term of that sum). ``max_norm``
rescales rows in the forward pass without a gradient, so it changes nothing here; ``sparse=True``
only changes the layout of ``W.grad`` (the quantities here are dense).

EmbeddingBag: the samples are the bags (rows of a 2-D input, or ``offsets`` into a 1-D one), padded
to a common length. ``sum``/``mean``: a slot per bag entry with factor ``per_sample_weights`` or
``1 / bag size``, all receiving the bag's output gradient. ``max``: a slot per feature ``j``
reading the single element ``(argmax row, j)`` (``R, d = V * D, 1``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backpack.derivatives.base import IO, Rule
from backpack.registry import register


@register(nn.Embedding)
class EmbeddingRule(Rule):
    """Per-sample weight gradients of row-reading layers by batched scatters (``index_add``)."""

    needs_output = False

    def jac_t_mat_prod(self, module: nn.Module, io: IO, mat: Tensor) -> Tensor:
        """Undefined: the input is integer indices."""
        raise NotImplementedError(
            f"{module}: the input holds integer indices, which have no gradient; nothing is "
            "backpropagated past an embedding layer (nor into per_sample_weights). Make it the "
            "first layer of the model."
        )

    jac_mat_prod = jac_t_mat_prod

    def _table(self, module: nn.Module) -> tuple[int, int]:
        """``(R, d)``: the weight as the slots read it, ``R`` rows of ``d`` entries."""
        return tuple(module.weight.shape)

    def _build(self, module: nn.Embedding, io: IO) -> tuple[Tensor, Tensor | None]:
        """Slots: rows ``[n, K]`` and factors ``[n, K]`` (None where all are 1): 0 at
        ``padding_idx``, else ``1/count`` of its index over the batch if ``scale_grad_by_freq``.
        """
        x, w = io.input0, None
        if module.scale_grad_by_freq:
            w = _inverse_counts(x, module.weight.dtype)
        if module.padding_idx is not None:
            keep = (x != module.padding_idx).to(module.weight.dtype)
            w = keep if w is None else w * keep
        n = x.shape[0]
        return x.reshape(n, -1), None if w is None else w.reshape(n, -1)

    def _slots(self, module: nn.Module, io: IO, mat: Tensor) -> Tensor:
        """``[v, n, *out] -> [v, n, K, d]``: the output gradient each slot receives."""
        return mat.reshape(*mat.shape[:2], -1, mat.shape[-1])

    def _unslot(self, module: nn.Module, io: IO, slots: Tensor) -> Tensor:
        """``[v, n, K, d] -> [v, n, *out]``: the adjoint of ``_slots``."""
        return slots.reshape(*slots.shape[:2], *io.input0.shape[1:], slots.shape[-1])

    def _layout(self, module: nn.Module, io: IO) -> tuple[Tensor, Tensor | None]:
        if "layout" not in io.cache:
            io.cache["layout"] = self._build(module, io)
        return io.cache["layout"]

    def _weighted(self, module: nn.Module, io: IO, mat: Tensor) -> Tensor:
        """``[v, n, *out] -> [v, n, K, d]``: each slot's share of ``mat``."""
        slots, weights = self._slots(module, io, mat), self._layout(module, io)[1]
        return slots if weights is None else slots * weights.unsqueeze(-1)

    def subsample(self, module: nn.Module, io: IO, g: Tensor, idx: list[int]) -> tuple[IO, Tensor]:
        """Restrict to samples ``idx``, keeping factors computed on the full batch."""
        index = torch.tensor(idx, device=g.device)
        rows, weights = self._layout(module, io)
        sub, g_sub = super().subsample(module, io, g, idx)
        sub.cache["layout"] = (
            rows.index_select(0, index),
            None if weights is None else weights.index_select(0, index),
        )
        return sub, g_sub

    def _keys(self, module: nn.Module, io: IO, groups: Tensor) -> Tensor:
        """Flat row ``group * R + row`` of every slot; ``groups`` broadcasts against ``[n, K]``."""
        return (groups * self._table(module)[0] + self._layout(module, io)[0]).flatten()

    def param_jac_t_mat_prod(
        self, module: nn.Module, io: IO, mat: Tensor, name: str, sum_batch: bool = True
    ) -> Tensor:
        """``[v, n, *out] -> [v, (n,) V, D]``: one ``index_add`` of the weighted slots."""
        mat = self._weighted(module, io, mat)
        v, n, _, d = mat.shape
        groups = v if sum_batch else v * n
        group = torch.arange(groups, device=mat.device).view(v, 1 if sum_batch else n, 1)
        out = mat.new_zeros(groups * self._table(module)[0], d)
        out.index_add_(0, self._keys(module, io, group), mat.reshape(-1, d))
        return out.view(v, *([] if sum_batch else [n]), *module.weight.shape)

    def add_batch_grad(
        self, module: nn.Module, io: IO, g: Tensor, name: str, acc: Tensor
    ) -> Tensor | None:
        """``acc [n, V, D]`` plus each sample's weighted slots at their rows (one ``index_add``
        into ``acc``, no zeroed ``[n, V, D]`` of its own)."""
        mat = self._weighted(module, io, g.unsqueeze(0))
        _, n, _, d = mat.shape
        if acc.shape != (n, *module.weight.shape) or acc.dtype != mat.dtype:
            return None
        group = torch.arange(n, device=mat.device).view(1, n, 1)
        acc.view(-1, d).index_add_(0, self._keys(module, io, group), mat.reshape(-1, d))
        return acc

    def param_jac_mat_prod(self, module: nn.Module, io: IO, mat: Tensor, name: str) -> Tensor:
        """``[v, V, D] -> [v, n, *out]``: each slot reads its row of ``mat``, scaled."""
        rows, weights = self._layout(module, io)
        slots = mat.reshape(mat.shape[0], *self._table(module))[:, rows]
        return self._unslot(module, io, slots if weights is None else slots * weights[..., None])

    kron_input_rows = True  # W [V, D] is a Linear weight W^T: Kronecker factors [A, G]

    def kron_factors(
        self, module: nn.Module, io: IO, mat: Tensor, name: str
    ) -> list[tuple[Tensor, Tensor]]:
        """One Kronecker block ``(a [1, n, 1, V, K], b [v, n, 1, D, K])``: the slots as
        positions, ``a`` each slot's one-hot row times its factor, ``b`` what flows to it."""
        rows, weights = self._layout(module, io)
        a = F.one_hot(rows, self._table(module)[0]).to(mat.dtype)  # [n, K, V]
        if weights is not None:
            a = a * weights.unsqueeze(-1)
        b = self._slots(module, io, mat)  # [v, n, K, D]
        return [(a.transpose(1, 2)[None, :, None], b.transpose(2, 3)[:, :, None])]

    def _segments(self, module: nn.Module, io: IO, mat: Tensor) -> tuple[Tensor, Tensor]:
        """Rows of ``J^T mat`` per (vector, sample) that can be nonzero: keys
        ``(v * n + sample) * R + row`` ``[u]`` and the rows ``[u, d]``, slots of a key summed.
        """
        mat = self._weighted(module, io, mat)
        v, n, _, d = mat.shape
        group = torch.arange(v * n, device=mat.device).view(v, n, 1)
        uniq, inverse = torch.unique(self._keys(module, io, group), return_inverse=True)
        return uniq, mat.new_zeros(uniq.numel(), d).index_add_(0, inverse, mat.reshape(-1, d))

    def _grad_segments(self, module: nn.Module, io: IO, g: Tensor) -> tuple[Tensor, Tensor]:
        """``_segments`` of the output gradient ``g`` ``[n, *out]`` (keys ``sample * R + row``)."""
        if "segments" not in io.cache:
            io.cache["segments"] = self._segments(module, io, g.unsqueeze(0))
        return io.cache["segments"]

    def batch_l2(self, module: nn.Module, io: IO, g: Tensor, name: str) -> Tensor:
        """``[n]``: squared norms of the per-(sample, row) rows, summed per sample."""
        keys, rows = self._grad_segments(module, io, g)
        out = rows.new_zeros(g.shape[0])
        return out.index_add_(0, keys // self._table(module)[0], rows.square().sum(1))

    def sum_grad_squared(self, module: nn.Module, io: IO, g: Tensor, name: str) -> Tensor:
        """``[V, D]``: squared per-(sample, row) rows, summed per row."""
        keys, rows = self._grad_segments(module, io, g)
        out = rows.new_zeros(self._table(module))
        return out.index_add_(0, keys % out.shape[0], rows.square()).view(module.weight.shape)

    def param_diag(
        self, module: nn.Module, io: IO, mat: Tensor, name: str, sum_batch: bool = True
    ) -> Tensor:
        """``sum_v (J^T mat)_v ** 2`` ``[(n,) V, D]``: squared per-(vector, sample, row) rows,
        summed per (sample,) row."""
        keys, rows = self._segments(module, io, mat)
        n, (r, d) = mat.shape[1], self._table(module)
        lead = [] if sum_batch else [n]
        out = rows.new_zeros((r if sum_batch else n * r), d)
        out.index_add_(0, keys % out.shape[0], rows.square())
        return out.view(*lead, *module.weight.shape)


def _inverse_counts(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``1 / count`` of each entry's value over all of ``x``, shaped like ``x``."""
    _, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    return counts.to(dtype).reciprocal()[inverse]


@register(nn.EmbeddingBag)
class EmbeddingBagRule(EmbeddingRule):
    """``nn.EmbeddingBag`` (sum/mean/max; 2-D input, or 1-D input and ``offsets``): the batch is
    the bag axis."""

    def _table(self, module: nn.EmbeddingBag) -> tuple[int, int]:
        rows, dim = module.weight.shape
        return (rows * dim, 1) if module.mode == "max" else (rows, dim)

    def _slots(self, module: nn.EmbeddingBag, io: IO, mat: Tensor) -> Tensor:
        if module.mode == "max":  # slot j: feature j's maximum
            return mat.unsqueeze(-1)
        return mat.unsqueeze(2).expand(-1, -1, self._layout(module, io)[0].shape[1], -1)

    def _unslot(self, module: nn.EmbeddingBag, io: IO, slots: Tensor) -> Tensor:
        return slots.squeeze(-1) if module.mode == "max" else slots.sum(2)

    def kron_factors(
        self, module: nn.EmbeddingBag, io: IO, mat: Tensor, name: str
    ) -> list[tuple[Tensor, Tensor]]:
        """A bag is one position whose input is its weighted one-hot rows summed:
        ``(a [1, n, 1, V, 1], b [v, n, 1, D, 1])``."""
        if module.mode == "max":
            raise NotImplementedError(
                f"KFAC/KFLR/KFRA (Kronecker factors): {module} (mode='max') reads one row per "
                "feature, which is no matrix product with its input; use mode='sum'/'mean', a "
                "diagonal extension (DiagGGNExact), or freeze its weight (requires_grad=False)."
            )
        ((a, b),) = super().kron_factors(module, io, mat, name)
        return [(a.sum(-1, keepdim=True), b[..., :1])]

    def _build(self, module: nn.EmbeddingBag, io: IO) -> tuple[Tensor, Tensor | None]:
        """Slots of each bag, see the module docstring."""
        args = dict(zip(("input", "offsets", "per_sample_weights"), io.inputs), **io.kwargs)
        x, psw = args["input"], args.get("per_sample_weights")
        dtype = module.weight.dtype
        weights = torch.ones(x.shape, dtype=dtype, device=x.device) if psw is None else psw
        if module.scale_grad_by_freq:
            weights = weights * _inverse_counts(x, dtype)
        if module.padding_idx is not None:
            weights = weights * (x != module.padding_idx)
        rows, weights = self._padded(module, x, args.get("offsets"), weights.to(dtype))
        if module.mode == "mean":  # factors are 0 exactly at filler and padding slots here
            weights = weights / (weights != 0).sum(1, keepdim=True).clamp(min=1)
        if module.mode != "max":
            return rows, weights
        used = weights != 0  # no per_sample_weights in max mode: 0 only at filler and padding
        values = module.weight.detach()[rows].masked_fill(~used.unsqueeze(-1), -torch.inf)
        best = rows.gather(1, values.argmax(1))  # [n, D]; ties: the first, as PyTorch
        dim = module.weight.shape[1]
        elements = best * dim + torch.arange(dim, device=best.device)
        return elements, used.any(1, keepdim=True).to(dtype).expand_as(elements)

    @staticmethod
    def _padded(
        module: nn.EmbeddingBag, x: Tensor, offsets: Tensor | None, weights: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Bags as rows ``[n, K]`` (``K`` the longest bag) of indices and factors; filler slots
        read row 0 with factor 0."""
        if x.dim() == 2:
            return x, weights
        # the last bag runs to the end of the input (as PyTorch's forward does even where
        # ``include_last_offset`` gives a smaller final offset)
        starts = offsets[:-1] if module.include_last_offset else offsets
        starts, end = starts.long(), torch.tensor([x.numel()], device=x.device)
        pos = torch.arange(x.numel(), device=x.device)
        bag = torch.searchsorted(starts, pos, right=True) - 1  # empty bags: no position
        slot = pos - starts[bag]
        length = int((torch.cat([starts[1:], end]) - starts).max()) if starts.numel() else 0
        rows = x.new_zeros(starts.numel(), length)
        padded = weights.new_zeros(starts.numel(), length)
        rows[bag, slot], padded[bag, slot] = x, weights
        return rows, padded

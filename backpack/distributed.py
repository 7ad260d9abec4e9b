"""Multi-process training: each backward pass's quantities aggregated over the processes of a
``torch.distributed`` group, ``backpack(*exts, sync=True)`` (or ``sync=Sync(group, gather)``).

Rank ``r`` computes its quantities on its local batch: ``n_r`` samples, loss normaliser ``M_r``
(what ``reduction='mean'`` divides by: ``n_r`` for cross-entropy with class targets, the summed
target weights with ``weight``/``ignore_index``, ``numel`` for MSE and BCE; 1 for ``'sum'``). At
the end of the pass one ``all_reduce`` of a flat buffer (every aggregated quantity and the counts)
turns them into those of one process on the concatenated batch, ``n = sum_r n_r``,
``M = sum_r M_r`` (unequal local batches included):

- loss-scaled sums over samples (DiagGGNExact/MC, DiagHessian, KFAC/KFLR's ``G`` and exact
  ``[G]`` blocks): ``q = sum_r M_r q_r / M``;
- SumGradSquared (squares of gradients carrying ``1/M_r``): ``q = sum_r M_r^2 q_r / M^2``;
- sample means (Kronecker ``A`` factors, ``(1/n_r) sum a a^T``): ``A = sum_r n_r A_r / n``;
- Variance: from the global first and second moments, ``S/n - (F/n)^2`` with
  ``S = sum_r M_r^2 S_r / M^2``, ``F = sum_r M_r F_r / M``;
- per-sample quantities (BatchGrad ``M_r/M``, BatchL2Grad ``(M_r/M)^2``, BatchDiag* ``M_r/M``,
  SqrtGGN* ``sqrt(M_r/M)``) are rescaled to the global normaliser: each rank holds its own rows of
  the global result, no communication. With ``Sync(gather=True)`` one ``all_gather`` gives every
  rank all rows, concatenated in rank order (batch axis 0; SqrtGGN: axis 1).

Monte-Carlo quantities (DiagGGNMC, KFAC's ``G``, SqrtGGNMC): each rank draws its own targets, so
the synced value has the distribution of the single-process one (equal in expectation), not
equal to one given draw. KFRA and the curvature-product closures (GGNMP, HMP, PCHMP) raise: see
``check_syncable``.

Quantities are synced after every backward pass in the block, also under DDP's ``no_sync()``;
as without ``sync``, a pass overwrites the savefields of the previous one (they do not
accumulate). Every rank must reach the same extended modules in the same order (as DDP needs).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial, reduce
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn import Parameter
from torch.utils._pytree import tree_flatten

import backpack._torch_private as _tp
from backpack.engine.call import Call
from backpack.engine.reuse import Pieces
from backpack.extensions.base import BackpropExtension
from backpack.extensions.firstorder import (
    BatchGrad,
    BatchL2Grad,
    SumGradSquared,
    Variance,
    _batch_size,
)
from backpack.extensions.secondorder.dense import DenseStream
from backpack.extensions.secondorder.diag_ggn import (
    BatchDiagGGNExact,
    BatchDiagGGNMC,
    DiagGGNExact,
    DiagGGNMC,
)
from backpack.extensions.secondorder.diag_hessian import BatchDiagHessian, DiagHessian
from backpack.extensions.secondorder.hbp import HBP, KFAC, KFLR
from backpack.extensions.secondorder.kron import KroneckerExtension, _a_at, _map_factors
from backpack.extensions.secondorder.sqrt_ggn import SqrtGGNExact, SqrtGGNMC


@dataclass(frozen=True)
class Sync:
    """How ``backpack(..., sync=Sync(...))`` aggregates; ``sync=True`` is ``Sync()``.

    Args:
        group: the ``torch.distributed`` process group (None: the default group).
        gather: also gather the per-sample quantities of all ranks (one ``all_gather``).
    """

    group: Any = None
    gather: bool = False


# exact extension type -> (how it aggregates, power of the loss scale M_r it carries, batch axis)
_KINDS: dict[type, tuple[str, float, int]] = {
    BatchGrad: ("sample", 1, 0),
    BatchL2Grad: ("sample", 2, 0),
    BatchDiagGGNExact: ("sample", 1, 0),
    BatchDiagGGNMC: ("sample", 1, 0),
    BatchDiagHessian: ("sample", 1, 0),
    SqrtGGNExact: ("sample", 0.5, 1),
    SqrtGGNMC: ("sample", 0.5, 1),
    SumGradSquared: ("sum", 2, 0),
    DiagGGNExact: ("sum", 1, 0),
    DiagGGNMC: ("sum", 1, 0),
    DiagHessian: ("sum", 1, 0),
    Variance: ("variance", 2, 0),
    HBP: ("kron", 1, 0),
    KFAC: ("kron", 1, 0),
    KFLR: ("kron", 1, 0),
}


def check_syncable(exts: tuple[BackpropExtension, ...]) -> None:
    """Raise ``NotImplementedError`` for extensions whose quantities do not aggregate exactly."""
    for ext in exts:
        name = type(ext).__name__
        if isinstance(ext, KroneckerExtension) and isinstance(ext.stream, DenseStream):
            raise NotImplementedError(
                f"backpack(..., sync=True): {name} (KFRA) cannot be synced exactly. Its G is a "
                "recursion of batch averages, G_in = (1/N) sum_n J_n^T G_out J_n at every layer, "
                "a product of averages over the batch: the factors of the ranks' batches do not "
                "combine into those of the concatenated batch (only the last layer's would). Use "
                "KFLR (exact) or KFAC (Monte-Carlo), whose G sums over samples, or compute KFRA "
                "without sync (on the local batch)."
            )
        if type(ext) not in _KINDS:
            raise NotImplementedError(
                f"backpack(..., sync=True): {name} cannot be synced: "
                + (
                    "it stores closures over the local batch, not tensors. Compute the product "
                    "locally and all_reduce it (weighted by the ranks' loss normalisers)."
                    if name in ("GGNMP", "HMP", "PCHMP")
                    else "its scaling with the batch is unknown. Syncable: "
                    + ", ".join(sorted(t.__name__ for t in _KINDS))
                    + "."
                )
            )


class _Pass:
    """What one backward pass of one rank recorded: the losses' ``(reduction, normaliser)``,
    and per parameter reached (in backward order) ``[rule, batch size, Variance's first moment
    sum_n g_n, its sample count]``."""

    def __init__(self) -> None:
        self.losses: list[tuple[str, float]] = []
        self.params: dict[Parameter, list] = {}
        self.shared = False  # a module called several times stores at the end of the pass

    def normaliser(self) -> float | None:
        """``M_r`` of the pass's ``'mean'`` loss; None if its losses sum (no rescaling)."""
        if not self.losses:
            raise RuntimeError(
                "backpack(..., sync=True): no extended loss module ran in this backward pass, so "
                "its reduction (mean or sum) and the local normaliser are unknown. Extend the "
                "loss too: lossfunc = extend(nn.CrossEntropyLoss())."
            )
        means = [m for r, m in self.losses if r == "mean"]
        if not means:
            return None
        if len(self.losses) > 1:
            raise NotImplementedError(
                "backpack(..., sync=True): several extended losses in one backward pass, one of "
                "them with reduction='mean': their normalisers would be combined differently "
                "per loss. Use reduction='sum' (scaled as needed) or one loss module."
            )
        return means[0]


class SyncObserver(BackpropExtension):
    """Added by ``backpack(..., sync=...)``, not passed by users: records what each module call
    of a backward pass tells about the local batch, and aggregates ``exts``' quantities over
    the ranks at the end of the pass (one ``all_reduce``, one ``all_gather`` if gathering)."""

    def __init__(self, exts: tuple[BackpropExtension, ...], sync: Sync):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "backpack(..., sync=True) aggregates over the processes of torch.distributed: "
                "call torch.distributed.init_process_group(...) first (or drop sync)."
            )
        check_syncable(exts)
        super().__init__("")
        self.exts, self.sync = exts, sync
        self.variance = next((e for e in exts if type(e) is Variance), None)
        self._task, self._pass = None, _Pass()

    def run(self, call: Call) -> None:
        """Record this call's quantities for the aggregation at the end of the pass."""
        task = _tp.graph_task_id()
        if task != self._task:  # first module of a backward pass: aggregate at its end
            self._task, self._pass = task, _Pass()
            _tp.queue_at_backward_end(partial(self._aggregate, self._pass))
        rec, rule = self._pass, call.rule
        if rule is not None and rule.is_loss:
            reduction = getattr(call.module, "reduction", "sum")
            norm = rule.normaliser(call.module, call.io) if reduction == "mean" else 1.0
            rec.losses.append((reduction, float(norm)))
        for name, param in call.params():
            info = rec.params.setdefault(param, [rule, _batch_size(rule, call.module, call.g)])
            if self.variance is not None:  # Variance's first moment (summed over calls)
                io, g = call.view(self.variance.subsampling)
                first = rule.grad(call.module, io, g, name)
                if len(info) == 2:
                    info += [first, float(_batch_size(rule, call.module, g))]
                else:
                    info[2] = info[2] + first

    def collect(self, call: Call, pieces: Pieces) -> None:
        """A call of a module called several times: recorded like any other."""
        self.run(call)
        self._pass.shared = True

    def finish(self, pieces: Pieces) -> None:
        """Nothing to store: ``_aggregate`` runs at the end of the pass."""

    def _aggregate(self, rec: _Pass) -> None:
        """The end of the backward pass: every quantity of ``rec``'s parameters, aggregated."""
        if rec.shared:  # after the engine's callback storing the shared modules' quantities
            rec.shared = False
            _tp.queue_at_backward_end(partial(self._aggregate, rec))
            return
        norm = rec.normaliser()
        values = [
            (param, ext, info, getattr(param, ext.savefield, None))
            for param, info in rec.params.items()
            for ext in self.exts
        ]
        tensors = tree_flatten([v for *_, v in values])[0]
        dtype = reduce(torch.promote_types, (t.dtype for t in tensors), torch.float32)
        device = tensors[0].device if tensors else _device(self.sync.group)
        bucket = _Bucket(dtype, device)
        m_r = 1.0 if norm is None else norm
        m_slot = bucket.add(torch.tensor([m_r]))
        world, rank = dist.get_world_size(self.sync.group), dist.get_rank(self.sync.group)
        finishers, gathered = [], []
        for param, ext, info, value in values:
            if value is None:
                raise RuntimeError(
                    f"backpack(..., sync=True): {type(ext).__name__} stored no "
                    f"'{ext.savefield}' on a parameter of shape {tuple(param.shape)} in this "
                    "backward pass, so there is nothing to aggregate (a module handler that "
                    "skips it?)."
                )
            kind, power, axis = _KINDS[type(ext)]
            if kind == "sum":
                slot = bucket.add(value * m_r**power)
                finishers.append(partial(_set_sum, param, ext.savefield, value, slot, power))
            elif kind == "variance":
                first, n = info[2], info[3]
                second = n * (value + (first / n).square())  # sum_n g_n^2
                slots = tuple(map(bucket.add, (second * m_r**2, first * m_r, torch.tensor([n]))))
                finishers.append(partial(_set_variance, param, ext.savefield, value, slots))
            elif kind == "kron":
                finishers.append(_plan_kron(bucket, param, ext.savefield, value, info, m_r))
            else:
                finishers.append(partial(_rescale, value, m_r, power))
                if self.sync.gather:  # this rank's row count, at its place among the ranks'
                    counts = torch.zeros(world)
                    counts[rank] = value.shape[axis]
                    gathered.append((param, ext.savefield, value, axis, bucket.add(counts)))
        bucket.all_reduce(self.sync.group)
        m = bucket[m_slot].item() if norm is not None else 1.0
        for finish in finishers:
            finish(bucket, m)
        if gathered:
            _gather(gathered, bucket, dtype, device, self.sync.group)


def _device(group: Any) -> torch.device:
    """Where the group's collectives run: CUDA for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _Bucket:
    """Tensors flattened into one buffer, summed over the ranks by one ``all_reduce``."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device, self.parts = dtype, device, []

    def add(self, t: Tensor) -> int:
        self.parts.append(t.reshape(-1).to(self.device, self.dtype))
        return len(self.parts) - 1

    def all_reduce(self, group: Any) -> None:
        flat = torch.cat(self.parts)
        dist.all_reduce(flat, group=group)
        self.parts = flat.split([p.numel() for p in self.parts])

    def __getitem__(self, slot: int) -> Tensor:
        return self.parts[slot]


def _set_sum(
    param: Parameter, field: str, value: Tensor, slot: int, power: float, bucket: _Bucket, m: float
) -> None:
    setattr(param, field, (bucket[slot] / m**power).to(value.dtype).view_as(value))


def _set_variance(
    param: Parameter, field: str, value: Tensor, slots: tuple, bucket: _Bucket, m: float
) -> None:
    second, first, n = (bucket[s] for s in slots)
    var = second / (m**2 * n) - (first / (m * n)).square()
    setattr(param, field, var.to(value.dtype).view_as(value))


def _plan_kron(
    bucket: _Bucket, param: Parameter, field: str, value: list, info: list, m_r: float
) -> Any:
    """Add the factors of ``value`` to ``bucket`` (``A`` weighted by the batch size, ``G`` by
    ``M_r``); return what stores them once reduced.

    Returns:
        A function that stores the reduced factors on the parameter.
    """
    rule, n_r = info[0], info[1]
    exact = len(value) == 1 and isinstance(value[0], Tensor)  # [G]: the exact block, no A
    a_at = -1 if exact else _a_at(rule)
    slots = {}

    def add(at: tuple, f: Tensor, is_a: bool) -> None:
        slots[at] = bucket.add(f * (n_r if is_a else m_r))

    _map_factors(value, add, a_at)
    n_slot = bucket.add(torch.tensor([float(n_r)]))

    def finish(bucket: _Bucket, m: float) -> None:
        n = bucket[n_slot].item()

        def total(at: tuple, f: Tensor, is_a: bool) -> Tensor:
            return (bucket[slots[at]] / (n if is_a else m)).to(f.dtype).view_as(f)

        setattr(param, field, _map_factors(value, total, a_at))

    return finish


def _rescale(value: Tensor, m_r: float, power: float, bucket: _Bucket, m: float) -> None:
    """A per-sample quantity carrying ``1/M_r^power``, in place to carry ``1/M^power``."""
    value.mul_((m_r / m) ** power)


def _gather(
    gathered: list, bucket: _Bucket, dtype: torch.dtype, device: torch.device, group: Any
) -> None:
    """All ranks' rows of each per-sample quantity, concatenated along its batch axis in rank
    order: one ``all_gather`` of a flat buffer padded to the longest rank's."""
    counts = [bucket[slot].long().tolist() for *_, slot in gathered]  # [quantity][rank]
    rows = [v.movedim(axis, 0) for _, _, v, axis, _ in gathered]
    widths = [r.shape[1:].numel() for r in rows]
    lengths = [sum(c[k] * w for c, w in zip(counts, widths)) for k in range(len(counts[0]))]
    flat = torch.zeros(max(lengths), dtype=dtype, device=device)
    local = torch.cat([r.reshape(-1).to(dtype) for r in rows])
    flat[: local.numel()] = local
    parts = [torch.empty_like(flat) for _ in lengths]
    dist.all_gather(parts, flat, group=group)
    per_rank = [
        part[:length].split([c[k] * w for c, w in zip(counts, widths)])
        for k, (part, length) in enumerate(zip(parts, lengths))
    ]
    for q, (param, field, value, axis, _) in enumerate(gathered):
        whole = torch.cat([chunks[q].view(-1, *rows[q].shape[1:]) for chunks in per_rank])
        setattr(param, field, whole.to(value.dtype).movedim(0, axis))

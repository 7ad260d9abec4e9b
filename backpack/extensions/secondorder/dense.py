"""KFRA's stream: a dense, batch-averaged curvature block over one sample's activation, passed
backward through every module with ``jac_t_mat_prod`` (``DenseStream``), branching included, and
the per-sample column helpers the Kronecker factors share with it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from backpack._state import STATE
from backpack.derivatives.base import chunks
from backpack.engine.call import Call


@dataclass(frozen=True)
class Dense:
    """What ``DenseStream`` passes: the block ``mat`` ``[D, D]``, the losses it comes from and
    the path (``branch``) it travels on."""

    origins: frozenset
    mat: Tensor
    branch: int


_BRANCHES = itertools.count()


@dataclass(frozen=True)
class DenseStream:
    """A dense ``[D, D]`` curvature over the flattened activation of one sample, batch-averaged.

    Starts at a loss as ``sum_n S_n S_n^T`` (the summed per-sample loss Hessians over the
    normaliser) and passes a module as ``(1/N) sum_n J_n^T G J_n``, for any rule with
    ``jac_t_mat_prod``. Blocks of several losses add.

    Branching: a module with several inputs (a residual sum, ``torch.cat``, attention on
    different tensors) sends each input its own path, and the paths meet again where one tensor
    feeds them all. Their meeting block ``G_1 + G_2 + C + C^T`` needs the cross block ``C``
    between the paths' activations: it starts as ``(1/N) sum_n J_1n^T G J_2n`` at the fork and
    follows each path's steps as ``(1/N) sum_n J_n^T C`` (batch-averaged on one side at a time;
    exact at batch size one, like the rest of the recursion). Cross blocks live in a registry
    of the ``backpack`` block, keyed by pairs of paths.

    ``curvature`` (HBP): ``""`` the GGN; else each curved layer adds its residual ``sum_n
    sum_k g_nk d2out_nk/din_n2``, summed over the samples, from its signed factors as they are
    (``"hessian"``), without the negative ones (``"clip"``) or all counted positive (``"abs"``).
    """

    curvature: str = ""
    # what the engine asks of every stream (see ``backpack.engine.streams.Stream``): one set
    # of columns, none stored; residuals enter the dense block in ``propagate``, not as the
    # per-factor residuals (and mixed terms of reused modules) the engine handles
    draws = 1
    stores_columns = False
    residuals = False

    def start(self, call: Call, scale: float, lean: bool = True) -> Dense:
        """The loss Hessian ``S S^T`` ``[D, D]``: any root gives it (``lean`` is moot)."""
        root = call.rule.sqrt_hessian_lean(call.module, call.io).flatten(2)
        mat = torch.einsum("cnd,cne->de", root, root) * scale
        return Dense(frozenset({id(call.io)}), mat, next(_BRANCHES))

    def propagate(self, call: Call, value: Dense) -> list[Dense | None]:
        """``(1/N) sum_n J_n^T G J_n`` per input: ``J^T`` on G's columns per sample, transpose,
        again. Inputs that are one tensor (``mha(x, x, x)``) count once, with the summed ``J``.
        Cross blocks: with the other paths, pulled back per input; between inputs, new."""
        rule, module, g, dense = call.rule, call.module, call.grads[0], value.mat
        if rule.couples_samples(module):
            raise NotImplementedError(
                f"KFRA: {module} normalises with batch statistics, which couples the samples; "
                "the batch-averaged dense block assumes independent samples. Call model.eval()."
            )
        crosses = _crosses()
        partners = _partners(crosses, value.branch)
        ax, n, _ = out_layout(call)
        x = call.io.input0
        if isinstance(x, Tensor) and x.dim() > ax and x.shape[ax] != n:
            raise NotImplementedError(
                f"KFRA: {module} takes {x.shape[ax]} and gives {n} entries along the batch axis "
                f"{ax}: a module that moves the batch axis needs a rule whose batch_axis says so "
                "(the automatic rule assumes axis 0). Use KFLR or KFAC, or register a rule."
            )
        d = dense.shape[0]
        totals: dict = {}  # input i -> block; ("pair", i, j), ("other", path, i) -> crosses
        for idx in chunks(n, d * (d + call.io.input0[0].numel())):
            io = call.io
            if idx != slice(0, n):
                io, _ = rule.subsample(module, io, g, list(range(n))[idx])

            def jac_t(mat: Tensor, io: Any = io) -> list[Tensor | None]:  # [k, m, D_in] each
                res = rule.jac_t_mat_prod(module, io, mat)
                res = _merge_shared(res if isinstance(res, tuple) else (res,), call.in_keys)
                return [r if r is None else r.movedim(ax + 1, 1).flatten(2) for r in res]

            m = idx.stop - idx.start
            lefts = jac_t(columns(call, dense, m))
            live = [i for i, left in enumerate(lefts) if left is not None]
            for i in live:
                _add(totals, i, sandwich(call, lefts[i], lambda mat, i=i: jac_t(mat)[i]))
                for j in live[live.index(i) + 1 :]:  # sum_n J_j^T G J_i
                    pair = sandwich(call, lefts[i], lambda mat, j=j: jac_t(mat)[j])
                    _add(totals, ("pair", j, i), pair)
            for other, cross in partners.items():  # sum_n J_i^T C
                for i, part in enumerate(jac_t(columns(call, cross, m))):
                    if part is not None:
                        _add(totals, ("other", other, i), part.sum(1).T)
        live = sorted(k for k in totals if isinstance(k, int))
        branch = {i: value.branch if len(live) == 1 else next(_BRANCHES) for i in live}
        _drop(crosses, value.branch)
        for key, block in totals.items():
            if isinstance(key, int):
                continue
            if key[0] == "pair":
                _set(crosses, branch[key[1]], branch[key[2]], block / n)
            elif key[0] == "other" and key[2] in branch:
                _set(crosses, branch[key[2]], key[1], block / n)
        out: list[Dense | None] = [None] * (max(live) + 1 if live else 0)
        residual = self.residual(call) if self.curvature else None
        for i in live:
            mat = totals[i] / n
            out[i] = Dense(value.origins, mat if residual is None else mat + residual, branch[i])
        return out

    def residual(self, call: Call) -> Tensor | None:
        """The layer's residual summed over the samples ``[D_in, D_in]``, signs per
        ``curvature``; None where the layer is linear in its input."""
        weight = {"hessian": lambda s: s, "clip": lambda s: max(s, 0.0), "abs": abs}
        total, ax = None, call.rule.batch_axis(call.module)
        for sign, r in call.rule.residual_factors(call.module, call.io, call.g):
            if isinstance(r, tuple):
                raise NotImplementedError(
                    f"HBP with curvature {self.curvature!r} and BATCH_AVERAGE: {call.module} is "
                    "curved in several inputs; use the SQRT strategy (EXACT or SAMPLING)."
                )
            r = r.movedim(ax + 1, 1).flatten(2)
            block = weight[self.curvature](sign) * torch.einsum("rnd,rne->de", r, r)
            total = block if total is None else total + block
        return total

    @staticmethod
    def end(value: Dense) -> None:
        """A path that reaches the model's input: its cross blocks are not needed any more."""
        _drop(_crosses(), value.branch)

    @staticmethod
    def accumulate(old: Dense, new: Dense) -> Dense:
        """Two paths meet at one tensor: ``G_1 + G_2 + C + C^T`` with their cross block ``C``;
        the merged path keeps both paths' cross blocks with the others, summed."""
        crosses = _crosses()
        cross = crosses.get((old.branch, new.branch))
        if cross is None and old.origins & new.origins:
            raise NotImplementedError(
                "KFRA: two paths from one loss meet without a recorded fork (a module that "
                "sends one loss's curvature to several inputs outside backpack's rules). Use "
                "KFLR or KFAC."
            )
        mat = old.mat + new.mat if cross is None else old.mat + new.mat + cross + cross.T
        for other, block in _partners(crosses, new.branch).items():
            if other != old.branch:
                mine = crosses.get((old.branch, other))
                _set(crosses, old.branch, other, block if mine is None else mine + block)
        _drop(crosses, new.branch)
        return Dense(old.origins | new.origins, mat, old.branch)


def _crosses() -> dict:
    """The cross blocks of the current ``backpack`` block: ``(path a, path b) -> [D_a, D_b]``
    (both orientations)."""
    return STATE.crosses


def _partners(crosses: dict, branch: int) -> dict[int, Tensor]:
    """Cross blocks ``[D_branch, D_other]`` of ``branch`` with the other paths."""
    return {b: c for (a, b), c in crosses.items() if a == branch}


def _set(crosses: dict, a: int, b: int, block: Tensor) -> None:
    crosses[(a, b)], crosses[(b, a)] = block, block.T


def _drop(crosses: dict, branch: int) -> None:
    for key in [k for k in crosses if branch in k]:
        del crosses[key]


def _add(totals: dict, key: Any, block: Tensor) -> None:
    totals[key] = block if key not in totals else totals[key] + block


def out_layout(call: Call) -> tuple[int, int, tuple[int, ...]]:
    """Batch axis, batch size and one sample's shape of the module's output."""
    g, ax = call.grads[0], call.rule.batch_axis(call.module)
    return ax, g.shape[ax], (*g.shape[:ax], *g.shape[ax + 1 :])


def as_output(call: Call, rows: Tensor) -> Tensor:
    """``[k, m, d]`` (``d``: a flattened sample's output) -> ``[k, *out]`` of ``m`` samples in
    the module's layout."""
    ax, _, sample = out_layout(call)
    return rows.reshape(*rows.shape[:2], *sample).movedim(1, ax + 1)


def columns(call: Call, mat: Tensor, m: int) -> Tensor:
    """The columns of ``mat`` ``[d, k]`` on each of ``m`` samples: ``[k, *out]``."""
    d, k = mat.shape
    return as_output(call, mat.T.unsqueeze(1).expand(k, m, d)).contiguous()


def sandwich(call: Call, left: Tensor, f: Any) -> Tensor:
    """``sum_n F_n G E_n^T`` ``[D_f, D_e]`` from ``left = e(columns of G)`` ``[d, m, D_e]``, for
    per-sample linear maps ``e, f: [k, *out] -> [k, m, D]`` (``G`` symmetric); ``e = f``: the
    sandwich ``sum_n F_n G F_n^T``."""
    return f(as_output(call, left.permute(2, 1, 0))).sum(1).T


def _merge_shared(parts: tuple, keys: tuple) -> tuple:
    """Parts of inputs that are one tensor (same autograd key) summed into the first's slot."""
    out, first = list(parts), {}
    for i, (part, key) in enumerate(zip(parts, keys)):
        if part is None or key is None:
            continue
        if key in first:
            out[first[key]], out[i] = out[first[key]] + part, None
        else:
            first[key] = i
    return tuple(out)

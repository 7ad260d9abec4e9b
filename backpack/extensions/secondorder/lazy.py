"""The Hessian residuals of elementwise layers, applied lazily (the stream of HMP and PCHMP).

An elementwise layer ``y = f(x)`` adds ``diag(f''(x) g)`` to the Hessian w.r.t. its input. As
signed factors (``Stream``) that diagonal has one column per entry of a sample, so pulling it
back through the layers before builds dense ``[D, D]`` per-sample blocks. ``LazyStream`` keeps
it as a diagonal instead and records the path from every tensor to it: the curvature w.r.t. a
tensor ``t`` from these residuals is the graph ``Lazy`` of the module calls between ``t`` and
the elementwise layers, applied to a matrix on demand (``lazy_product``): push the matrix
forward through the Jacobians (summed where paths meet), multiply by each residual diagonal,
pull back through the transposed Jacobians (summed where paths fork). That is the Hessian-
vector product of the residual terms by forward-over-reverse differentiation on the recorded
calls: memory ``V`` times the activations, time about one forward and one backward pass of
Jacobian products per product, and exact on graphs that branch (the cross terms between the
paths come out of the sums). Non-elementwise residuals (softmax, normalisation layers, ...)
flow as signed factors, as in ``Stream``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module

from backpack.derivatives.base import IO, Rule
from backpack.engine.call import Call
from backpack.engine.factors import OWN, Origin
from backpack.engine.streams import Stream

LAZY = Origin(0, kind=OWN)  # the lazy part among a stream's signed factors (sign +1)


@dataclass(frozen=True, eq=False)
class Step:
    """One recorded module call the lazy part passes backward: its rule and detached record
    (no memo: products run long after the backward pass, see ``io``)."""

    module: Module
    rule: Rule
    record: tuple  # (inputs, output, kwargs), detached
    out_shape: tuple[int, ...]  # [n, *out] of the output the stream keys
    inputs: int  # number of inputs

    def io(self, memo: dict) -> IO:
        """A fresh record per product (``memo``), shared by the Jacobian products of it."""
        if id(self) not in memo:
            memo[id(self)] = IO(*self.record)
        return memo[id(self)]

    def jac(self, i: int, mat: Tensor, memo: dict) -> Tensor:
        """``J_i mat``: ``[v, n, *in_i] -> [v, n, *out]`` for input ``i``."""
        io = self.io(memo)
        if self.inputs == 1 and type(self.rule).jac_mat_prod is not Rule.jac_mat_prod:
            return self.rule.jac_mat_prod(self.module, io, mat)
        # rules of several inputs have only J^T: J_i mat is the gradient of <J_i^T u, mat> in u
        with torch.enable_grad():
            u = mat.new_zeros(mat.shape[0], *self.out_shape, requires_grad=True)
            back = self._pick(self.rule.jac_t_mat_prod(self.module, io, u), i)
            (out,) = torch.autograd.grad(back, u, mat, allow_unused=True)
        return torch.zeros_like(u) if out is None else out.detach()

    def jac_t(self, i: int, mat: Tensor, memo: dict) -> Tensor:
        """``J_i^T mat``: ``[v, n, *out] -> [v, n, *in_i]``."""
        return self._pick(self.rule.jac_t_mat_prod(self.module, self.io(memo), mat), i)

    @staticmethod
    def _pick(out: Any, i: int) -> Tensor:
        return out[i] if isinstance(out, tuple) else out


@dataclass(frozen=True, eq=False)
class Lazy:
    """The residual curvature w.r.t. one tensor ``t``: ``diag`` ``[n, *t]`` (the residual of
    the elementwise layers ``t`` feeds, None: none) and ``edges`` ``(step, i, child)``: ``t``
    is input ``i`` of ``step``, whose output has the residual curvature ``child``."""

    edges: tuple[tuple[Step, int, Lazy], ...]
    diag: Tensor | None

    def __add__(self, other: Lazy) -> Lazy:
        """One tensor feeding several modules: their edges and residuals together."""
        if self.diag is None or other.diag is None:
            diag = self.diag if other.diag is None else other.diag
        else:
            diag = self.diag + other.diag
        return Lazy(self.edges + other.edges, diag)


def _diagonal(rule: Rule) -> bool:
    """Whether the rule's residual is the diagonal ``residual_diag`` (elementwise layers)."""
    return type(rule).residual_factors is Rule.residual_factors


@dataclass(frozen=True)
class LazyStream(Stream):
    """``Stream`` with residuals whose elementwise residuals flow lazily, as ``Lazy`` under the
    key ``LAZY``; the other factors (the losses' roots, other residuals) as in ``Stream``."""

    residuals: bool = True

    def residual_factors(self, call: Call) -> list[tuple[float, Any]]:
        return [] if _diagonal(call.rule) else super().residual_factors(call)

    def propagate(self, call: Call, terms: dict) -> list[dict]:
        lazy = terms.get(LAZY)
        outs = super().propagate(call, {o: t for o, t in terms.items() if o != LAZY})
        diag = None
        if _diagonal(call.rule):
            diag = call.rule.residual_diag(call.module, call.io, call.g)
        if lazy is None and diag is None:
            return outs
        io = call.io
        step = Step(call.module, call.rule, (io.inputs, io.output, io.kwargs),
                    tuple(call.grads[0].shape), len(call.in_keys))  # fmt: skip
        for i, key in enumerate(call.in_keys):
            edges = ((step, i, lazy[1]),) if lazy is not None else ()
            mine = diag.detach() if diag is not None and i == 0 else None
            if key is not None and (edges or mine is not None):
                outs[i] = {**(outs[i] or {}), LAZY: (1.0, Lazy(edges, mine))}
        return outs


def lazy_product(
    starts: list[tuple[Lazy, Tensor]], modify: Callable[[Tensor], Tensor] | None = None
) -> list[Tensor]:
    """``C mat`` of the residual curvature ``C`` jointly over the tensors of ``starts``
    ``[(lazy, mat [v, n, *t])]``, one ``[v, n, *t]`` per start: with ``m`` the tangent of
    ``mat`` at every tensor downstream, ``sum_r J_r^T diag(modify(r)) m_r`` over the residual
    diagonals ``r`` (``J_r``: Jacobian from the starts to ``r``'s tensor)."""
    order = _topological([lazy for lazy, _ in starts])
    memo: dict = {}
    tangent: dict[int, Tensor] = {}
    for lazy, mat in starts:
        tangent[id(lazy)] = mat + tangent[id(lazy)] if id(lazy) in tangent else mat
    cot: dict[int, Tensor] = {}
    for lazy in order:  # forward: a tensor's tangent is complete before it is passed on
        mat = tangent.pop(id(lazy), None)
        if mat is None:
            continue
        if lazy.diag is not None:
            cot[id(lazy)] = (lazy.diag if modify is None else modify(lazy.diag)) * mat
        for step, i, child in lazy.edges:
            out = step.jac(i, mat, memo)
            tangent[id(child)] = out + tangent[id(child)] if id(child) in tangent else out
    for lazy in reversed(order):  # backward: a tensor's cotangent is complete before it is used
        for step, i, child in lazy.edges:
            if id(child) in cot:
                back = step.jac_t(i, cot[id(child)], memo)
                cot[id(lazy)] = back + cot[id(lazy)] if id(lazy) in cot else back
    return [cot.get(id(lazy), torch.zeros_like(mat)) for lazy, mat in starts]


def _topological(roots: list[Lazy]) -> list[Lazy]:
    """The graph's nodes reachable from ``roots``, each before the nodes it has edges to."""
    post, seen = [], set()
    stack = [(r, False) for r in roots]
    while stack:
        node, done = stack.pop()
        if done:
            post.append(node)
        elif id(node) not in seen:
            seen.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for _, _, child in node.edges if id(child) not in seen)
    return post[::-1]

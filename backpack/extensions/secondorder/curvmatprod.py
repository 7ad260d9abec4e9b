"""Block curvature-matrix products, stored as callables: ``hmp``, ``ggnmp``, ``pchmp``.

For a parameter ``theta`` of a module whose output curvature is ``C = sum_k sign_k S_k S_k^T``
(the backpropagated stream), the stored ``f(mat)`` maps ``[V, *theta] -> [V, *theta]`` to
``J_theta^T C J_theta mat`` over the batch: the ``theta`` block of the GGN (exact root, no
residuals), of the Hessian (with the curved layers' residuals, plus ``(sum_k g_k d2out_k /
dtheta2) mat`` where the module's output is curved in ``theta`` itself) or of the
positive-curvature Hessian (residuals' negative parts dropped, ``'clip'``, or counted positive,
``'abs'``; where the output is curved in ``theta`` itself, that residual's eigenvalues alike).
HMP and PCHMP apply the elementwise layers' residuals lazily (``lazy``): memory linear in the
activations. ``f`` also takes one vector ``[*theta] -> [*theta]``; other shapes raise.

A closure holds the module, its detached forward record, copies of the factors and the lazy
residuals (records and residual diagonals of the modules downstream; and, for HMP on a module
curved in its parameters, the detached output gradient), nothing else: it stays valid after
later backward passes and keeps no autograd graph alive.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module
from torch.utils._pytree import tree_map

from backpack.derivatives.base import IO, Rule
from backpack.engine.call import Call
from backpack.engine.factors import couple
from backpack.engine.reuse import Pieces
from backpack.engine.streams import Stream
from backpack.extensions.secondorder.base import SecondOrderExtension
from backpack.extensions.secondorder.lazy import LAZY, LazyStream, lazy_product


def block_product(
    calls: list[tuple[Module, Rule, str, IO, dict]],
    modify: Callable[[Tensor], Tensor] | None = None,
) -> Callable:
    """``mat [V, *theta] -> J^T C J mat [V, *theta]``, summed over the batch, for the
    curvature ``C`` of the module's output: the signed factors ``terms = {origin: (sign, S_k
    [c_k, n, *out])}`` give ``sum_k sign_k S_k S_k^T``, per sample or (coupled origins, after
    BatchNorm with batch statistics) spanning the whole batch; ``terms[LAZY]`` adds the lazy
    residuals of the elementwise layers (their diagonals through ``modify``, see ``lazy``).

    ``calls``: ``(module, rule, name, io, terms)`` of each call using the parameter (several
    where a module is called several times in one forward, or modules own one Parameter
    object; ``name`` local to ``module``): then ``J = sum_c J_c``; an origin's columns are the
    same columns in every call (zero in a call it does not reach)."""
    owners = [c[:3] for c in calls]
    calls = _couple_across_calls([c[3:] for c in calls])
    lazies = [terms.get(LAZY, (1.0, None))[1] for _, terms in calls]
    columns = _columns([{o: t for o, t in terms.items() if o != LAZY} for _, terms in calls])
    # the detached records, factors and lazy residuals, nothing else (no cache, no graph)
    records = [(io.inputs, io.output, io.kwargs) for io, _ in calls]

    def product(mat: Tensor) -> Tensor:
        with torch.no_grad():
            fresh = [IO(*record) for record in records]  # own memo: not the backward's
            jmats = [r.param_jac_mat_prod(m, io, mat, n) for (m, r, n), io in zip(owners, fresh)]
            backs = [0 for _ in fresh]  # [V, n, *out] per call: C J mat
            if columns is not None:
                # per-sample columns act on their own sample (block-diagonal over the batch),
                # coupled columns on the whole batch (their coefficient sums over n)
                stacked, signs, coupled = columns
                coef = 0
                for f, jmat in zip(stacked, jmats):
                    coef = coef + torch.einsum("cnk,vnk->cnv", f.flatten(2), jmat.flatten(2))
                coef = coef * signs[:, None, None]
                coef = torch.where(coupled, coef.sum(1, keepdim=True), coef)
                for c, (f, jmat) in enumerate(zip(stacked, jmats)):
                    back = torch.einsum("cnv,cnk->vnk", coef, f.flatten(2))
                    backs[c] = back.view_as(jmat)
            starts = [(lazy, jmat) for lazy, jmat in zip(lazies, jmats) if lazy is not None]
            if starts:
                extra = iter(lazy_product(starts, modify))
                backs = [b if lz is None else b + next(extra) for b, lz in zip(backs, lazies)]
            return sum(
                r.param_jac_t_mat_prod(m, io, back, n, sum_batch=True)
                for (m, r, n), io, back in zip(owners, fresh, backs)
                if not isinstance(back, int)
            )

    return product


def _columns(calls: list[dict]) -> tuple[list[Tensor], Tensor, Tensor] | None:
    """The signed factors of each call stacked ``[c, n, *out]`` (zero for origins a call does
    not reach), the columns' signs ``[c]`` and whether they are coupled ``[c, 1, 1]``; None
    without factors. Copies: a factor may carry its autograd node (``_OWNER``), which would
    keep the graph, and with it the model, alive in a cycle through autograd."""
    origins: dict = {}  # origin -> (sign, number of columns)
    for terms in calls:
        origins.update({o: (s, m.shape[0]) for o, (s, m) in terms.items()})
    ref = next((m for terms in calls for _, m in terms.values()), None)
    if ref is None:
        return None
    signs = [torch.full((c,), float(s), dtype=ref.dtype) for s, c in origins.values()]
    coupled = [torch.full((c, 1, 1), o.coupled) for o, (_, c) in origins.items()]

    def stacked(terms: dict) -> Tensor:
        shape = next(iter(terms.values()))[1].shape[1:]
        return torch.cat(
            [
                terms[o][1].detach() if o in terms else ref.new_zeros(c, *shape)
                for o, (_, c) in origins.items()
            ]
        )

    device = ref.device
    return [stacked(t) for t in calls], torch.cat(signs).to(device), torch.cat(coupled).to(device)


def _couple_across_calls(calls: list[tuple[IO, dict]]) -> list[tuple[IO, dict]]:
    """An origin coupled (after BatchNorm with batch statistics) in one call and per sample in
    another is coupled in both, so its columns are the same columns in every call."""
    keys = {o for _, terms in calls for o in terms}
    both = {o for o in keys if o.has_coupled_form_in(keys)}
    if not both:
        return calls

    def coupled_terms(terms: dict) -> dict:
        out = {}
        for o, (s, m) in terms.items():
            if o in both:
                o, m = couple(o, m)
            out[o] = (s, m)
        return out

    return [(io, coupled_terms(terms)) for io, terms in calls]


class _CurvMatProd(SecondOrderExtension):
    """Stores, per parameter, the product with its block of the stream's curvature."""

    accepts_coupled_samples = True  # a whole-batch curvature: defined where samples couple

    def __init__(self, savefield: str, residuals: bool):
        super().__init__(savefield)
        self.stream = LazyStream() if residuals else Stream()

    def modify(self, terms: dict) -> dict:
        """The signed factors whose curvature the product uses (all of them by default)."""
        return terms

    def modify_diag(self, diag: Tensor) -> Tensor:
        """An elementwise layer's residual diagonal as the product uses it (unchanged)."""
        return diag

    def own(self, call: Call, io: IO, name: str) -> Callable | None:
        """The product with the parameter's own Hessian residual (HMP), None to leave it out."""
        return None

    def param_value(self, call: Call, io: Any, terms: dict, name: str) -> Callable:
        calls = [(call.module, call.rule, name, io, self.modify(terms))]
        product = block_product(calls, self.modify_diag)
        param = dict(call.params())[name]
        return self.checked(_plus(product, [self.own(call, io, name)]), call.module, name, param)

    def add_pieces(self, call: Call, io: Any, terms: dict, name: str, pieces: Pieces) -> None:
        """Keep each call's module, rule, record and factors: the product needs ``sum_c J_c``
        on both sides; the calls' own residuals add."""
        entry = (call.module, call.rule, name, io, self.modify(terms), self.own(call, io, name))
        pieces.sums.setdefault(("calls", self.savefield, pieces.pid(call, name)), []).append(entry)

    def add_mixed(self, call: Call, io: Any, mixed: dict, name: str, pieces: Pieces) -> None:
        """The Hessian block between dependent calls (``backpack.engine.reuse``): ``B +
        B^T`` with rows ``B[p] = J^T M_c[p]`` ``[P, P]`` for the mixed derivatives ``M_c``
        ``[P, n, *in]`` of downstream calls; GGNMP leaves it out."""
        pid = pieces.pid(call, name)
        mats = [m for o, (_, m) in mixed.items() if o.part[0] == pid]  # part: (pid, call)
        if not mats or not self.stream.residuals:
            return
        rule, module = call.rule, call.module

        def block() -> Tensor:
            total = sum(
                rule.param_jac_t_mat_prod(module, io, m, name, sum_batch=True).flatten(1)
                for m in mats
            )
            return (total + total.T).detach()

        pieces.add(("mixed", self.savefield, pid), block)

    def finish_value(self, pieces: Pieces, pid: int) -> Callable:
        calls = pieces.sums[("calls", self.savefield, pid)]
        module, name = calls[0][0], calls[0][2]
        product = block_product([c[:5] for c in calls], self.modify_diag)
        mixed = pieces.sums.get(("mixed", self.savefield, pid))
        product = _plus(product, [c[5] for c in calls] + [self.dense(mixed)])
        return self.checked(product, module, name, pieces.params[pid])

    def checked(self, product: Callable, module: Module, name: str, param: Tensor) -> Callable:
        """``product`` on ``[V, *P]``, also taking one vector ``[*P]`` (returning ``[*P]``);
        any other shape raises."""
        shape = tuple(param.shape)

        def apply(mat: Tensor) -> Tensor:
            if isinstance(mat, Tensor) and tuple(mat.shape) == shape:
                return product(mat.unsqueeze(0))[0]
            if isinstance(mat, Tensor) and tuple(mat.shape[1:]) == shape and mat.dim() > 0:
                return product(mat)
            got = list(mat.shape) if isinstance(mat, Tensor) else type(mat).__name__
            raise ValueError(
                f"{type(self).__name__} ('{self.savefield}') of parameter {name!r} of {module}: "
                f"mat must have the parameter's shape [*P] = {list(shape)} or [V, *P] = "
                f"{['V', *shape]}, got {got}."
            )

        return apply

    def dense(self, block: Tensor | None) -> Callable | None:
        """The product with a dense ``[P, P]`` residual block (None: none)."""
        if block is None:
            return None
        return lambda mat: (mat.flatten(1) @ block).view_as(mat)


def _plus(product: Callable, owns: list[Callable | None]) -> Callable:
    """``product`` plus the own-residual products in ``owns`` (None: none)."""
    owns = [o for o in owns if o is not None]
    if not owns:
        return product

    def total(mat: Tensor) -> Tensor:
        out = product(mat)
        for own in owns:
            extra = own(mat)
            out = out if extra is None else out + extra.detach()
        return out

    return total


def _curved_in_params(rule: Rule) -> bool:
    """Whether the rule may have parameter residuals (overrides ``param_residual_mat_prod``)."""
    return type(rule).param_residual_mat_prod is not Rule.param_residual_mat_prod


def _own_residual(call: Call, io: IO, name: str) -> Callable | None:
    """``mat -> (sum_k g_k d2out_k/dtheta2) mat`` on detached copies of the record and output
    gradient; None for rules linear in their parameters."""
    if not _curved_in_params(call.rule):
        return None
    module, rule, record = call.module, call.rule, (io.inputs, io.output, io.kwargs)
    g = tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, call.view(None)[1])

    def own(mat: Tensor) -> Tensor | None:
        return rule.param_residual_mat_prod(module, IO(*record), g, name, mat)

    return own


class GGNMP(_CurvMatProd):
    """``ggnmp``: ``f(mat [V, *P]) -> [V, *P]``, the parameter's GGN block times ``mat``."""

    def __init__(self, savefield: str = "ggnmp"):
        super().__init__(savefield, residuals=False)


class HMP(_CurvMatProd):
    """``hmp``: ``f(mat [V, *P]) -> [V, *P]``, the parameter's Hessian block times ``mat``."""

    def __init__(self, savefield: str = "hmp"):
        super().__init__(savefield, residuals=True)

    def own(self, call: Call, io: IO, name: str) -> Callable | None:
        return _own_residual(call, io, name)


class PCHMP(_CurvMatProd):
    """``pchmp``: ``f(mat [V, *P]) -> [V, *P]``, the positive-curvature Hessian block times
    ``mat``: each curved layer's residual ``r`` enters as ``max(r, 0)`` (``'clip'``) or
    ``|r|`` (``'abs'``)."""

    MODIFY = ("clip", "abs")
    DENSE_LIMIT = 4096

    def __init__(self, savefield: str = "pchmp", modify: str = "clip"):
        if modify not in self.MODIFY:
            raise ValueError(f"PCHMP: modify must be one of {self.MODIFY}, got {modify!r}.")
        super().__init__(savefield, residuals=True)
        self.modify_name = modify

    def own(self, call: Call, io: IO, name: str) -> Callable | None:
        """The parameter's own residual ``R`` (where the output is curved in it), modified like
        the layers' residuals: its eigenvalues clipped at 0 or made absolute. Needs ``R``
        densely (``P`` Hessian-vector products and a ``[P, P]`` eigendecomposition per backward
        pass): parameters over ``DENSE_LIMIT`` entries raise."""
        own = _own_residual(call, io, name)
        if own is None:
            return None
        param = dict(call.params())[name]
        size = param.numel()
        if size <= self.DENSE_LIMIT:  # None where the output is linear in this parameter
            eye = torch.eye(size, dtype=param.dtype, device=param.device)
            residual = own(eye.view(size, *param.shape))
            return None if residual is None else self.dense(residual.reshape(size, size))
        if own(torch.zeros_like(param).unsqueeze(0)) is not None:
            raise NotImplementedError(
                f"PCHMP: the output of {call.module} is curved in its parameter {name!r}; the "
                f"positive part of its own Hessian residual needs that [{size}, {size}] block "
                f"densely (limit {self.DENSE_LIMIT} entries). Use HMP (the full Hessian block) "
                "or GGNMP, or freeze the parameter."
            )
        return None

    def modify_diag(self, diag: Tensor) -> Tensor:
        """An elementwise layer's residual diagonal clipped at 0 or made absolute (its
        eigenvalues: exact, elementwise)."""
        return diag.clamp(min=0) if self.modify_name == "clip" else diag.abs()

    def dense(self, block: Tensor | None) -> Callable | None:
        """A dense residual block with its eigenvalues clipped at 0 or made absolute."""
        if block is None:
            return None
        evals, evecs = torch.linalg.eigh((block + block.T) / 2)
        evals = evals.clamp(min=0) if self.modify_name == "clip" else evals.abs()
        return super().dense((evecs * evals) @ evecs.T)

    def modify(self, terms: dict) -> dict:
        return positive_curvature(terms, self.modify_name)


def positive_curvature(terms: dict, modify: str) -> dict:
    """Signed factors ``{origin: (sign, S)}`` with the negative ones dropped (``'clip'``) or
    counted positive (``'abs'``): residual parts carry their sign, the loss's root is
    positive."""
    if modify == "clip":
        return {o: (s, m) for o, (s, m) in terms.items() if s > 0}
    return {o: (1.0, m) for o, (s, m) in terms.items()}

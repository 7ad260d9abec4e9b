"""Derivatives of any module call by ``torch.func`` (exact, dense, slow).

For layers whose Hessian residual is not diagonal (normalisation, attention, recurrences) the
residual ``sum_k g_k d2out_k/din2`` is built from Hessian-vector products of the scalar
``s = <g, out(x)>`` over the whole batch: samples are independent, so a tangent holding the
same basis vector ``e_j`` at every sample yields column ``j`` of every per-sample block at once
(``D`` products for ``D`` entries per sample, vectorised with ``vmap``).

The same pieces, with vjp/jvp of a recorded call under ``vmap`` (per column, per sample), make
the automatic rule (``backpack.derivatives.automatic``) of modules without a hand-written one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.nn import Module
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from backpack._state import disable
from backpack.derivatives.base import IO, dense_factors


def _as_tuple(x: Any) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def call(module: Module, state: dict, args: tuple, kwargs: dict) -> Any:
    """The module's forward on ``state``; extended modules record nothing (no nested hooks).
    An in-place module gets copies: it would overwrite the recorded inputs."""
    if getattr(module, "inplace", False) is True:
        args = tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, args)
    with disable():
        return functional_call(module, state, args, kwargs)


def state_of(module: Module) -> dict[str, Tensor]:
    """Detached parameters and copied buffers (a forward in train mode updates buffers)."""
    state = {k: p.detach() for k, p in module.named_parameters()}
    state.update({k: b.clone() for k, b in module.named_buffers()})
    return state


def is_float(t: Any) -> bool:
    """Whether ``t`` is a floating-point tensor (differentiable)."""
    return isinstance(t, Tensor) and t.is_floating_point()


def input_leaves(args: tuple) -> tuple[list, Callable[[list], tuple]]:
    """The input leaves as the engine keys them (nested tuples and lists flattened, as an RNN's
    state) and the function rebuilding the arguments from them."""
    if any(isinstance(a, (tuple, list)) for a in args):
        leaves, spec = tree_flatten(args)
        return leaves, lambda new: tree_unflatten(new, spec)
    return list(args), tuple


def float_outputs(out: Any) -> list[Tensor]:
    """The floating-point tensor leaves of a module's output, in pytree order."""
    return [o for o in tree_flatten(out)[0] if is_float(o)]


def _inner(outs: Any, gs: Any) -> Tensor:
    """``sum_k <g_k, out_k>`` over the tensor outputs (pytree order) that have a gradient."""
    leaves = [o for o in tree_flatten(outs)[0] if isinstance(o, Tensor)]
    pairs = zip(leaves, _as_tuple(gs))
    return sum((o * g).sum() for o, g in pairs if isinstance(o, Tensor) and g is not None)


def _diff_positions(io: IO) -> list[int]:
    return [i for i, t in enumerate(io.inputs) if is_float(t)]


def hessian_blocks(
    module: Module, io: IO, g: Any, pos: Sequence[int], axes: Sequence[int], chunk: int = 256
) -> Tensor:
    """Per-sample blocks ``[n, D, D]`` of ``d2 <g, out> / dx2`` w.r.t. the inputs at ``pos``
    (jointly, flattened and concatenated; batch axis ``axes``), ``D`` entries per sample.

    Cost: ``D`` Hessian-vector products of the whole batch, each with the same basis vector at
    every sample (exact where samples are independent).
    """
    xs = [io.inputs[i].movedim(a, 0) for i, a in zip(pos, axes)]  # batch first
    n, sizes = xs[0].shape[0], [x[0].numel() for x in xs]
    state = state_of(module)

    def scalar(*moved: Tensor) -> Tensor:
        args = list(io.inputs)
        for i, a, x in zip(pos, axes, moved):
            args[i] = x.movedim(0, a)
        return _inner(call(module, state, tuple(args), io.kwargs), g)

    def column(*tangents: Tensor) -> tuple[Tensor, ...]:
        return jvp(grad(scalar, argnums=tuple(range(len(xs)))), tuple(xs), tangents)[1]

    d = sum(sizes)
    basis = torch.eye(d, dtype=xs[0].dtype, device=xs[0].device)
    cols = []
    for j in range(0, d, chunk):
        e = basis[j : j + chunk]  # [b, D]
        tangents = [
            part.reshape(len(e), 1, *x.shape[1:]).expand(len(e), *x.shape).contiguous()
            for part, x in zip(e.split(sizes, dim=1), xs)
        ]
        out = vmap(column)(*tangents)  # per input [b, n, *x]
        cols.append(torch.cat([o.reshape(len(e), n, -1) for o in out], dim=2))
    hess = torch.cat(cols).permute(1, 2, 0)  # [n, D (row), D (column)]
    return (hess + hess.transpose(1, 2)) / 2


def residual_factors_autograd(
    module: Module, io: IO, g: Any, in_axes: Sequence[int] | None = None, chunk: int = 256
) -> list[tuple[float, Any]]:
    """Signed factors of the per-sample blocks of ``d2 <g, out> / dx2`` over the module's
    floating-point tensor inputs (jointly), as ``Rule.residual_factors`` returns them.

    ``in_axes``: batch axis of each input (default 0). Cost: ``D`` Hessian-vector products
    (``D`` input entries per sample) and an eigendecomposition of ``[n, D, D]``.
    """
    pos = _diff_positions(io)
    if not pos:  # integer inputs (indices): nothing to differentiate
        return []
    axes = [0 if in_axes is None else in_axes[i] for i in pos]
    hess = hessian_blocks(module, io, g, pos, axes, chunk)
    xs = [io.inputs[i].movedim(a, 0) for i, a in zip(pos, axes)]
    sizes, d = [x[0].numel() for x in xs], hess.shape[-1]
    out = []
    for sign, r in dense_factors(hess, (d,)):
        parts = tuple(
            p.reshape(d, *x.shape).movedim(1, a + 1) for p, x, a in zip(r.split(sizes, 2), xs, axes)
        )
        full: list = [None] * len(io.inputs)
        for i, p in zip(pos, parts):
            full[i] = p
        out.append((sign, full[0] if len(full) == 1 else tuple(full)))
    return out


def param_residual_diag_autograd(
    module: Module,
    io: IO,
    g: Any,
    name: str,
    sum_batch: bool = True,
    in_axes: Sequence[int] | None = None,
    out_axes: Sequence[int] | None = None,
    chunk: int = 256,
) -> Tensor:
    """Diagonal of ``d2 <g, out> / dtheta2`` for parameter ``name``, ``[(n,) *param]``.

    Summed: ``P`` Hessian-vector products over the batch. Per sample: the same under ``vmap``
    over samples (``in_axes``/``out_axes``: batch axis of each input/output, default 0).
    """
    state = state_of(module)
    theta = state.pop(name)
    p = theta.numel()

    def scalar(th: Tensor, inputs: tuple, gs: Any) -> Tensor:
        out = call(module, {**state, name: th}, inputs, io.kwargs)
        return _inner(out, gs)

    def diag(inputs: tuple, gs: Any) -> Tensor:
        def hvp(e: Tensor) -> Tensor:
            return jvp(lambda th: grad(scalar)(th, inputs, gs), (theta,), (e.view_as(theta),))[1]

        basis = torch.eye(p, dtype=theta.dtype, device=theta.device)
        parts = [
            (vmap(hvp)(basis[j : j + chunk]).reshape(-1, p) * basis[j : j + chunk]).sum(1)
            for j in range(0, p, chunk)
        ]
        return torch.cat(parts).view_as(theta)

    if sum_batch:
        return diag(io.inputs, g)
    gs = _as_tuple(g)
    in_ax = [0 if in_axes is None else in_axes[i] for i in range(len(io.inputs))]
    out_ax = [0 if out_axes is None else out_axes[i] for i in range(len(gs))]

    def one(inputs: tuple, gs_n: tuple) -> Tensor:
        inputs = tuple(
            x.unsqueeze(a) if isinstance(x, Tensor) else x for x, a in zip(inputs, in_ax)
        )
        gs_n = tuple(None if t is None else t.unsqueeze(a) for t, a in zip(gs_n, out_ax))
        return diag(inputs, gs_n if isinstance(g, tuple) else gs_n[0])

    in_dims = tuple(a if isinstance(x, Tensor) else None for x, a in zip(io.inputs, in_ax))
    g_dims = tuple(None if t is None else a for t, a in zip(gs, out_ax))
    try:
        return vmap(one, in_dims=(in_dims, g_dims))(tuple(io.inputs), gs)
    except RuntimeError:  # fused kernels without a batching rule (nn.RNN): one call per sample

        def pick(objs: tuple, dims: tuple, k: int) -> tuple:
            return tuple(o if d is None else o.select(d, k) for o, d in zip(objs, dims))

        n = gs[0].shape[out_ax[0]]
        return torch.stack(
            [one(pick(io.inputs, in_dims, k), pick(gs, g_dims, k)) for k in range(n)]
        )


def param_residual_mat_prod_autograd(
    module: Module, io: IO, g: Any, name: str, mat: Tensor
) -> Tensor:
    """``(d2 <g, out> / dtheta2) mat`` ``[V, *param]`` for parameter ``name`` and ``mat``
    ``[V, *param]``: one Hessian-vector product of the recorded call per column."""
    state = state_of(module)
    theta = state.pop(name)

    def scalar(th: Tensor) -> Tensor:
        return _inner(call(module, {**state, name: th}, io.inputs, io.kwargs), g)

    def hvp(v: Tensor) -> Tensor:
        return jvp(grad(scalar), (theta,), (v,))[1]

    try:
        return vmap(hvp)(mat)
    except RuntimeError:  # fused kernels without a batching rule (nn.RNN): one column at a time
        return torch.stack([hvp(v) for v in mat])


def recorded(module: Module, io: IO) -> tuple[list, list[int], Callable]:
    """``(leaves, pos, forward)``: the input leaves, the positions of the floating-point ones
    and ``forward(xs, state)``, the float outputs of the recorded call with those replaced."""
    leaves, rebuild = input_leaves(io.inputs)
    pos = [i for i, t in enumerate(leaves) if is_float(t)]

    def forward(xs: Any, state: dict) -> list[Tensor]:
        args = list(leaves)
        for i, x in zip(pos, xs):
            args[i] = x
        return float_outputs(call(module, state, rebuild(args), io.kwargs))

    return leaves, pos, forward


def cotangents(outs: list[Tensor], mat: Any) -> list[Tensor]:
    """One ``[v, *out_i]`` per output: ``mat`` for the first (a tuple: one per output), zeros
    where none is given."""
    mats = [*(mat if isinstance(mat, tuple) else (mat,))]
    mats += [None] * (len(outs) - len(mats))
    v = next(m for m in mats if m is not None).shape[0]
    return [o.new_zeros(()).expand(v, *o.shape) if m is None else m for o, m in zip(outs, mats)]


def per_sample_vjp(module: Module, io: IO, cts: list[Tensor], name: str) -> Tensor | None:
    """``[n, v, *param]``: vmap over samples of the vjp of a one-sample forward (tensor
    arguments whose leading size is ``n`` are split, others shared); None where that fails."""
    n = cts[0].shape[1]
    leaves, rebuild = input_leaves(io.inputs)
    kw_leaves, kw_spec = tree_flatten(io.kwargs)

    def dims(objs: list) -> list[int | None]:
        return [0 if isinstance(t, Tensor) and t.dim() and t.shape[0] == n else None for t in objs]

    in_dims, kw_dims = dims(leaves), dims(kw_leaves)
    state = state_of(module)
    theta = state.pop(name)

    def one(xs: list, kws: list, cts_n: list[Tensor]) -> Tensor:
        args = rebuild([x if d is None else x.unsqueeze(0) for x, d in zip(xs, in_dims)])
        kw = [x if d is None else x.unsqueeze(0) for x, d in zip(kws, kw_dims)]
        kwargs = tree_unflatten(kw, kw_spec)

        def forward(th: Tensor) -> list[Tensor]:
            return float_outputs(call(module, {**state, name: th}, args, kwargs))

        fn = vjp(forward, theta)[1]
        return vmap(lambda ct: fn([c.unsqueeze(0) for c in ct])[0])(cts_n)

    try:
        return vmap(one, in_dims=(in_dims, kw_dims, 1))(leaves, kw_leaves, cts)
    except Exception:  # no batching rule, random numbers, a forward that needs the batch, ...
        return None


def split_samples(t: Tensor | None, n: int, axis: int = 0) -> Tensor | None:
    """``[n, *t.shape]``: copy ``k`` of ``t`` is zero but at sample ``k`` of ``axis``. A tensor
    without that batch axis must be zero (it is repeated)."""
    if t is None:
        return None
    if t.dim() > axis and t.shape[axis] == n:
        eye = torch.eye(n, dtype=t.dtype, device=t.device)
        return t.unsqueeze(0) * eye.view(n, *[1] * axis, n, *[1] * (t.dim() - axis - 1))
    if t.any():
        raise NotImplementedError(
            f"backpack: an output of shape {tuple(t.shape)} has no batch axis {axis} (batch "
            f"size {n}): the automatic rule cannot split its gradient per sample."
        )
    return t.new_zeros(()).expand(n, *t.shape)


def masked_vjp(fn: Any, cts: list[Tensor], name: str) -> Tensor:
    """``[v, n, *param]``: the vjp of the whole batch for each column restricted to one sample
    (exact for any batch layout of the inputs; ``n`` times the cost and memory)."""
    v, n = cts[0].shape[:2]
    split = [split_samples(c, n, axis=1).flatten(0, 1) for c in cts]  # [n * v, n, *out]
    return vmap(lambda ct: fn(ct)[1][name])(split).unflatten(0, (n, v)).transpose(0, 1)


def agree(per: Tensor | None, total: Tensor) -> bool:
    """Whether per-sample values ``[n, ...]`` sum to ``total`` (up to rounding)."""
    tol = torch.finfo(total.dtype).eps ** 0.5
    return per is not None and torch.allclose(
        per.sum(0), total, rtol=tol, atol=tol * total.abs().max()
    )


__all__ = [
    "agree",
    "call",
    "cotangents",
    "float_outputs",
    "hessian_blocks",
    "input_leaves",
    "is_float",
    "masked_vjp",
    "param_residual_diag_autograd",
    "per_sample_vjp",
    "recorded",
    "residual_factors_autograd",
    "split_samples",
    "state_of",
]

"""Second derivatives of any module call by ``torch.func`` (exact, dense, slow).

For layers whose Hessian residual is not diagonal (normalisation, attention, recurrences) the
residual ``sum_k g_k d2out_k/din2`` is built from Hessian-vector products of the scalar
``s = <g, out(x)>`` over the whole batch: samples are independent, so a tangent holding the
same basis vector ``e_j`` at every sample yields column ``j`` of every per-sample block at once
(``D`` products for ``D`` entries per sample, vectorised with ``vmap``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call, grad, jvp, vmap
from torch.nn import Module
from torch.utils._pytree import tree_flatten

from backpack._context import disable
from backpack.derivatives.base import IO, dense_factors


def _as_tuple(x: Any) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def _call(module: Module, state: dict, args: tuple, kwargs: dict) -> Any:
    """The module's forward on ``state``; extended modules record nothing (no nested hooks)."""
    with disable():
        return functional_call(module, state, args, kwargs)


def _state(module: Module) -> dict[str, Tensor]:
    """Detached parameters and copied buffers (a forward in train mode updates buffers)."""
    state = {k: p.detach() for k, p in module.named_parameters()}
    state.update({k: b.clone() for k, b in module.named_buffers()})
    return state


def _inner(outs: Any, gs: Any) -> Tensor:
    """``sum_k <g_k, out_k>`` over the tensor outputs (pytree order) that have a gradient."""
    leaves = [o for o in tree_flatten(outs)[0] if isinstance(o, Tensor)]
    pairs = zip(leaves, _as_tuple(gs))
    return sum((o * g).sum() for o, g in pairs if isinstance(o, Tensor) and g is not None)


def _diff_positions(io: IO) -> list[int]:
    return [i for i, t in enumerate(io.inputs) if isinstance(t, Tensor) and t.is_floating_point()]


def residual_factors_autograd(
    module: Module, io: IO, g: Any, in_axes: Sequence[int] | None = None, chunk: int = 256
) -> list[tuple[float, Any]]:
    """Signed factors of the per-sample blocks of ``d2 <g, out> / dx2`` over the module's
    floating-point tensor inputs (jointly), as ``Rule.residual_factors`` returns them.

    ``in_axes``: batch axis of each input (default 0). Cost: ``D`` Hessian-vector products
    (``D`` input entries per sample) and an eigendecomposition of ``[n, D, D]``.
    """
    pos = _diff_positions(io)
    axes = [0 if in_axes is None else in_axes[i] for i in pos]
    xs = [io.inputs[i].movedim(a, 0) for i, a in zip(pos, axes)]  # batch first
    n, sizes = xs[0].shape[0], [x[0].numel() for x in xs]
    state = _state(module)

    def scalar(*moved: Tensor) -> Tensor:
        args = list(io.inputs)
        for i, a, x in zip(pos, axes, moved):
            args[i] = x.movedim(0, a)
        return _inner(_call(module, state, tuple(args), io.kwargs), g)

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
    hess = (hess + hess.transpose(1, 2)) / 2
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
    state = _state(module)
    theta = state.pop(name)
    p = theta.numel()

    def scalar(th: Tensor, inputs: tuple, gs: Any) -> Tensor:
        out = _call(module, {**state, name: th}, inputs, io.kwargs)
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


__all__ = ["residual_factors_autograd", "param_residual_diag_autograd"]

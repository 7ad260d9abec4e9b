"""A module called several times in one forward pass (shared encoder, recurrence unrolled by
hand, a layer applied twice): its quantities sum the contributions of every call.

With calls ``c`` sharing ``theta`` the per-sample gradient is ``sum_c J_c^T g_c`` and the square
root of the GGN is ``sum_c J_c^T S_c`` (per origin of the flowing factors: an origin's columns
are the same columns in every call). Both are linear in the calls, the stored quantities
(norms, squares, outer products) are not. So each call adds its linear *pieces* to the module's
``Pieces`` and the extensions finish (square, sum, store) once, at the end of the backward pass.
Only calls reached in this backward pass count.

The Hessian has one more term where a call's input depends on ``theta`` through another call
(a layer applied twice in a chain, a recurrence): ``d2L/dtheta_c dtheta_c'`` contains
``M_c dx_c/dtheta_c'`` with ``M_c = d/dx_c (sum_k g_ck dout_ck/dtheta)`` the mixed second
derivative of call ``c``. ``M_c`` ``[P, n, *in]`` flows backward like a factor of origin
``Origin(pieces, (name, c), MIXED)``, ignored by every other module; at an upstream call ``c'``
of the module, ``J_c'^T`` of it is ``M_c dx_c/dtheta_c'`` and its diagonal (twice: the block and its
transpose) is added. Costs ``P`` columns per parameter: meant for small shared layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap
from torch.nn import Module, Parameter
from torch.utils._pytree import tree_flatten

from backpack.derivatives.autograd import recorded, state_of
from backpack.derivatives.base import IO, Rule
from backpack.engine.call import Call
from backpack.engine.factors import MIXED, Factor, Origin

MIXED_BUDGET = 1 << 28  # entries of one parameter's mixed second derivatives


class Pieces:
    """Sums over the calls of one module, in one backward pass, of per-call linear pieces.

    Keys say what a piece is (kind, parameter, subsampling, origin ...); extensions that need
    the same piece (``BatchGrad`` and ``Variance``: the per-sample gradients) share it.
    """

    __slots__ = ("module", "rule", "params", "exts", "calls", "sums", "_last")

    def __init__(
        self, module: Module, rule: Rule, params: list[tuple[str, Parameter]], exts: tuple
    ):
        self.module, self.rule, self.params = module, rule, params
        self.exts = exts  # the extensions that collect on this module (and finish it)
        self.calls = 0  # calls reached so far; the engine counts them
        self.sums: dict = {}
        self._last: dict = {}  # key -> the call that last added to it

    def add(self, key: Any, compute: Callable[[], Any]) -> None:
        """Add ``compute()`` (a tensor, or None for nothing) to the sum at ``key``, once per
        call however many extensions ask."""
        if self._last.get(key) == self.calls:
            return
        self._last[key] = self.calls
        piece = compute()
        if piece is None:
            return
        old = self.sums.get(key)
        if old is None:
            self.sums[key] = piece
        elif old.shape != piece.shape:
            raise ValueError(
                f"backpack: the calls of {self.module} in one forward pass give pieces of shapes "
                f"{tuple(old.shape)} and {tuple(piece.shape)} for {key[0]!r}; per-sample and "
                "curvature quantities of a module called several times need the same batch "
                "size (and shapes) in every call."
            )
        else:
            self.sums[key] = old + piece  # out of place: a piece may be a view of a gradient

    def add_terms(self, key: Any, terms: dict, compute: Callable[[Any, Tensor], Tensor]) -> None:
        """Per origin of the signed factors ``terms``: add ``compute(origin, S)`` at
        ``(*key, origin)`` and remember the origin's sign at ``("sign", origin)``."""
        for origin, (sign, mat) in terms.items():
            self.sums[("sign", origin)] = sign
            self.add((*key, origin), lambda o=origin, m=mat: compute(o, m))

    def with_prefix(self, key: tuple) -> dict:
        """``{last: sum}`` of the sums at keys ``(*key, last)``, in the order first added."""
        n = len(key)
        return {k[n]: v for k, v in self.sums.items() if len(k) == n + 1 and k[:n] == key}

    def terms(self, key: tuple) -> dict:
        """``{origin: (sign, sum)}`` of the pieces added by ``add_terms`` with ``key``."""
        return {o: (self.sums[("sign", o)], v) for o, v in self.with_prefix(key).items()}


def mixed_factors(
    module: Module, io: IO, g: Any, name: str, chunk: int = 256
) -> tuple[Tensor | None, ...] | None:
    """``M_i [P, n, *in_i]``, ``M_i[p] = d/d in_i (sum_k g_k dout_k/dtheta_p)`` per input leaf
    as the engine keys them (None where not differentiated), by forward-over-reverse
    ``torch.func`` (one tangent per entry ``p`` of the parameter, every sample at once); None
    where all vanish (a bias)."""
    state = state_of(module)
    theta = state.pop(name)
    leaves, pos, forward = recorded(module, io)
    gs = g if isinstance(g, tuple) else (g,)

    def input_grads(th: Tensor) -> tuple[Tensor, ...]:
        def scalar(*xs: Tensor) -> Tensor:
            outs = forward(xs, {**state, name: th})
            return sum((o * t).sum() for o, t in zip(outs, gs) if t is not None)

        return grad(scalar, argnums=tuple(range(len(pos))))(*(leaves[i] for i in pos))

    def column(e: Tensor) -> tuple[Tensor, ...]:
        return jvp(input_grads, (theta,), (e.view_as(theta),))[1]

    basis = torch.eye(theta.numel(), dtype=theta.dtype, device=theta.device)
    with torch.no_grad():
        parts = [vmap(column)(basis[j : j + chunk]) for j in range(0, len(basis), chunk)]
    cols = [torch.cat(c) for c in zip(*parts)]
    if not any(c.any() for c in cols):
        return None
    full: list = [None] * len(leaves)
    for i, c in zip(pos, cols):
        full[i] = c
    return tuple(full)


def start_mixed(call: Call, pieces: Pieces, new: list) -> None:
    """Add this call's mixed second derivatives (see the module docstring) to ``new``, the
    factors flowing to each input, if the inputs depend on the module's parameters (another
    call of it upstream)."""
    params = call.params()
    if not depends_on(call.in_keys, [p for _, p in params]):
        return  # parallel calls (a shared encoder): the mixed terms vanish
    leaves = tree_flatten(call.io.inputs)[0]
    entries = sum(t.numel() for t in leaves if isinstance(t, Tensor) and t.is_floating_point())
    for name, param in params:
        if param.numel() * entries > MIXED_BUDGET:
            raise NotImplementedError(
                f"Hessian extensions: {call.module} is called several times in one forward "
                "pass, one call's input depending on another call; the exact Hessian then "
                f"backpropagates {param.numel()} columns (one per entry of '{name}') of "
                f"{entries} entries each, beyond the memory budget. Use a GGN extension "
                "(DiagGGNExact), or a separate module per call."
            )
        mixed = mixed_factors(call.module, call.io, call.g, name)
        if mixed is None:
            continue
        for i, m in enumerate(mixed):
            if m is not None:
                origin = Origin(id(pieces), (name, pieces.calls), MIXED)
                new[i] = {**(new[i] or {}), origin: Factor(1.0, m)}


def depends_on(keys: tuple, params: list[Tensor]) -> bool:
    """Whether the tensors with autograd identities ``keys`` depend on one of ``params``: the
    graph upstream of them reaches a parameter's gradient accumulator."""
    stack = [k[0] for k in keys if k is not None]
    seen = set(stack)
    while stack:
        node = stack.pop()
        if any(getattr(node, "variable", None) is p for p in params):
            return True
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return False

"""A parameter used by several calls in one forward pass (a module called several times: a
shared encoder, a recurrence unrolled by hand, a layer applied twice; or several modules owning
one Parameter object: a tied embedding and output layer, a shared projection): its quantities
sum the contributions of every call.

With calls ``c`` sharing ``theta`` the per-sample gradient is ``sum_c J_c^T g_c`` and the square
root of the GGN is ``sum_c J_c^T S_c`` (per origin of the flowing factors: an origin's columns
are the same columns in every call). Both are linear in the calls, the stored quantities
(norms, squares, outer products) are not. So each call adds its linear *pieces*, computed by
its own rule with its module's local parameter name, to the ``Pieces`` of its group (the
modules sharing a set of live records, ``record.tie``), summed per Parameter object; the
extensions finish (square, sum, store) once per parameter, at the end of the backward pass.
Only calls reached in this backward pass count.

The Hessian has one more term where a call's input depends on ``theta`` through another call
(a layer applied twice in a chain, a recurrence, the output layer tied to the embedding):
``d2L/dtheta_c dtheta_c'`` contains ``M_c dx_c/dtheta_c'`` with ``M_c = d/dx_c (sum_k g_ck
dout_ck/dtheta)`` the mixed second derivative of call ``c``. ``M_c`` ``[P, n, *in]`` flows
backward like a factor of origin ``Origin(pieces, (id(theta), c), MIXED)``, ignored by every
other module; at an upstream call ``c'`` using ``theta``, ``J_c'^T`` of it is ``M_c
dx_c/dtheta_c'`` and its diagonal (twice: the block and its transpose) is added. Costs ``P``
columns per parameter: meant for small shared layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap
from torch.nn import Module, Parameter
from torch.utils._pytree import tree_flatten

import backpack._torch_private as _tp
from backpack.derivatives.autograd import recorded, state_of
from backpack.derivatives.base import IO
from backpack.engine.call import Call
from backpack.engine.factors import MIXED, Factor, Origin

MIXED_BUDGET = 1 << 28  # entries of one parameter's mixed second derivatives


class Pieces:
    """Sums over the calls of a group of modules sharing parameters (one module called several
    times, or modules owning one Parameter object), in one backward pass, of per-call pieces.

    Keys say what a piece is (kind, parameter, subsampling, origin ...); a parameter is keyed
    by ``pid``, the id of the Parameter object (its local names may differ per module:
    ``out_proj.weight``, ``weight``). Extensions that need the same piece (``BatchGrad`` and
    ``Variance``: the per-sample gradients) share it.
    """

    __slots__ = ("modules", "params", "uses", "exts", "calls", "sums", "_last")

    def __init__(self, exts: tuple):
        self.modules: list[Module] = []  # the modules of the calls reached, in order
        self.params: dict[int, Parameter] = {}  # pid -> the parameter, of the calls reached
        self.uses: dict[int, int] = {}  # pid -> calls reached that use it
        self.exts = exts  # the extensions that collect on the group (and finish it)
        self.calls = 0  # calls reached so far
        self.sums: dict = {}
        self._last: dict = {}  # key -> the call that last added to it

    def begin(self, call: Call) -> None:
        """Count one more call reached, and the parameters it uses."""
        self.calls += 1
        if not any(m is call.module for m in self.modules):
            self.modules.append(call.module)
        for _, param in call.params():
            self.params[id(param)] = param
            self.uses[id(param)] = self.uses.get(id(param), 0) + 1

    @staticmethod
    def pid(call: Call, name: str) -> int:
        """The key of parameter ``name`` (local to ``call.module``): its object's id."""
        return id(call.module.get_parameter(name))

    def add(
        self, key: Any, compute: Callable[[], Any], into: Callable[[Tensor], Any] | None = None
    ) -> None:
        """Add ``compute()`` (a tensor, or None for nothing) to the sum at ``key``, once per
        call however many extensions ask. ``into(sum)``, where given, adds the piece into the
        sum in place (an embedding's few rows into a tied output layer's per-sample gradients:
        no zeroed buffer of the whole table) when nothing else holds the sum; None: it cannot."""
        if self._last.get(key) == self.calls:
            return
        self._last[key] = self.calls
        old = self.sums.get(key)
        if into is not None and old is not None and _exclusive(old):
            if into(old) is not None:
                return
        piece = compute()
        if piece is None:
            return
        if old is None:
            self.sums[key] = piece
        elif old.shape != piece.shape:
            raise ValueError(
                f"backpack: the calls of {', '.join(map(str, self.modules))} in one forward "
                f"pass, which share parameters, give pieces of shapes {tuple(old.shape)} and "
                f"{tuple(piece.shape)} for {key[0]!r}; per-sample and curvature quantities of "
                "a parameter used several times need the same batch size (and shapes) in every "
                "call."
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


def _exclusive(t: Tensor) -> bool:
    """Whether only ``Pieces.sums`` holds ``t`` (no view, no other tensor on its storage, no
    other reference: not a gradient autograd still uses, nor a cached result)."""
    return (
        _tp.view_base(t) is None
        and t.is_contiguous()
        and _tp.storage_use_count(t.untyped_storage()) <= 2
        and _tp.refcount(t) <= 4  # the sums dict, ``add``'s name, this argument, refcount's
    )


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
        return  # parallel calls (a shared encoder, parallel tied layers): no mixed terms
    leaves = tree_flatten(call.io.inputs)[0]
    entries = sum(t.numel() for t in leaves if isinstance(t, Tensor) and t.is_floating_point())
    for name, param in params:
        if param.numel() * entries > MIXED_BUDGET:
            raise NotImplementedError(
                f"Hessian extensions: '{name}' of {call.module} is used by several calls in "
                "one forward pass (a module called several times, or a Parameter tied to "
                "another module's), this call's input depending on another use; the exact "
                f"Hessian then backpropagates {param.numel()} columns (one per entry of "
                f"'{name}') of {entries} entries each, beyond the memory budget. Use a GGN "
                "extension (DiagGGNExact), or a separate (untied) parameter per call."
            )
        mixed = mixed_factors(call.module, call.io, call.g, name)
        if mixed is None:
            continue
        for i, m in enumerate(mixed):
            if m is not None:
                origin = Origin(id(pieces), (id(param), pieces.calls), MIXED)
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

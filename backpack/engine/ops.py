"""Record the torch function calls made between extended modules during the extended model's
forward pass, so that second-order quantities flow through functional code (residual
additions, ``view``/``permute``, ``torch.cat``, ``F.gelu``, attention written with ``matmul``)
and parameters read outside leaf modules (a class token, a layer scale) get every quantity.

``extend(model)`` gives the model (the root) a forward pre-hook that starts a ``Session``: a
``TorchFunctionMode`` that sees every torch function call until the root's forward returns.
Calls inside extended modules are theirs (the modules' pre-hooks count the depth). A call on
tensors that flow in the graph becomes the record of an ``Op`` (``backpack.derivatives.ops``)
with its own autograd-node hook, exactly like a module call. Calls on parameters and
constants alone without the batch axis become ``Derived`` tensors, replayed in the calls that
read them. The batch size is the leading size of the root's first tensor argument; a call
that takes a tensor with the batch axis and returns one without (``x.mean(0)``,
``x.transpose(0, 1)``) breaks the per-sample structure: its backward raises for every
extension.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module, Parameter
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import backpack._torch_private as _tp
from backpack._state import STATE
from backpack.derivatives.ops import (
    CONST,
    DERIVED,
    IN,
    PARAM,
    Call,
    Derived,
    Merge,
    Op,
    func_name,
    is_inplace,
)
from backpack.derivatives.ops import merged_rows as _merged_rows
from backpack.engine.driver import _on_output_grad
from backpack.engine.record import _Record

# views whose merging of the batch axis is followed exactly (``MergeRule``)
_VIEWS = frozenset(("view", "reshape", "flatten"))


class Session(TorchFunctionMode):
    """The recording of one forward pass of the root (module docstring)."""

    def __init__(self, batch: int | None):
        super().__init__()
        self.batch = batch
        self.depth = 0  # extended modules running (their inner calls are theirs)
        self.roots = 1  # nested roots (a model extended inside an extended model)
        self.off = False  # taken off the mode stack while an extended module runs
        self.derived: dict[tuple, Derived] = {}  # (node, output index) -> its replay

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):
        kwargs = kwargs or {}
        if self.depth or not torch.is_grad_enabled() or _tp.in_functorch_transform():
            # inside an extended module whose mode could not step aside, grad off, torch.func
            return func(*args, **kwargs)
        leaves, spec = tree_flatten((args, kwargs))
        if not any(isinstance(t, Tensor) and t.requires_grad for t in leaves):
            return func(*args, **kwargs)
        slots, keys = self._sort(leaves)
        inplace = is_inplace(func) and bool(leaves) and isinstance(leaves[0], Tensor)
        # the first argument of an in-place call as it was (the replay needs it)
        before = leaves[0].detach().clone() if inplace else None
        out = func(*args, **kwargs)
        if inplace:
            out = leaves[0]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
        floats = [(i, t) for i, t in enumerate(outs) if t.is_floating_point() and t.grad_fn]
        if not floats:
            return out
        single = len(outs) == 1
        for i, t in floats:
            key = (t.grad_fn, t.output_nr)
            if key in keys:
                continue  # returned an input unchanged (``x.to(x.dtype)``, ``contiguous``)
            call = Call(func, spec, _constants(leaves, slots), slots, None if single else i)
            if before is not None and slots[0][0] == CONST:
                call.leaves[0] = before
            self._record(call, t, keys, leaves, before)
        return out

    def _sort(self, leaves: list) -> tuple[list, tuple]:
        """The kind of each leaf and the autograd keys of the inputs that flow in."""
        slots: list = []
        keys = []
        for t in leaves:
            if not isinstance(t, Tensor):
                slots.append((CONST, None))
            elif t.grad_fn is not None:
                key = (t.grad_fn, t.output_nr)
                derived = self.derived.get(key)
                if derived is not None:
                    slots.append((DERIVED, derived))
                else:
                    slots.append((IN, None))
                    keys.append(key)
            elif t.requires_grad and isinstance(t, Parameter):
                slots.append((PARAM, t))
            elif t.requires_grad:  # a leaf input that requires grad: flows in, no key
                slots.append((IN, None))
                keys.append(None)
            else:
                slots.append((CONST, None))
        return slots, tuple(keys)

    def _record(
        self, call: Call, out: Tensor, in_keys: tuple, leaves: list, before: Tensor | None
    ) -> None:
        xs = tuple(t for t, (kind, _) in zip(leaves, call.slots) if kind == IN)
        if before is not None and call.slots[0][0] == IN:
            xs = (before, *xs[1:])
        # expanded inputs (``cls.expand(n, -1, -1)``) as dense copies: forward-mode AD (the
        # Hessian residuals) cannot attach a tangent to overlapping memory
        xs = tuple(_dense(x) for x in xs)
        if not xs and not self.batched(out):  # parameters and constants only
            self.derived[(out.grad_fn, out.output_nr)] = Derived(call)
            return
        batched_in = [x for x in xs if self.batched(x)]
        if batched_in and not self.batched(out):
            k = None
            if getattr(call.func, "__name__", "") in _VIEWS and len(xs) == 1:
                k = _merged_rows(tuple(xs[0].shape), tuple(out.shape))
            if k is None:
                refuse(out, call, tuple(batched_in[0].shape), self.batch)
                return
            module: Op = Merge(call, self.batch, k)
        else:
            module = Op(call, self.batch)
        record = _Record(module, xs, {}, out, in_keys)
        out.grad_fn.register_prehook(partial(_on_output_grad, record))

    def enter_module(self) -> None:
        """An extended module starts: step aside (its calls are its own)."""
        if not self.depth:
            self.off = _tp.pop_mode_if_top(self)
        self.depth += 1

    def exit_module(self) -> None:
        """The extended module's forward hook is done: record again."""
        self.depth -= 1
        if not self.depth and self.off:
            _tp.push_mode(self)
            self.off = False

    def batched(self, t: Tensor) -> bool:
        """Whether ``t`` has the batch axis first (always, where the batch size is unknown)."""
        return self.batch is None or (t.dim() > 0 and t.shape[0] == self.batch)

    def module_output(self, module: Module, args: tuple, kwargs: dict, output: Any) -> bool:
        """An extended module called on parameters and constants only, whose output lacks the
        batch axis (position embeddings of ids ``[1, T]``): its output becomes ``Derived``.

        Returns:
            Whether it did (then the call is not recorded as the module's).
        """
        if not isinstance(output, Tensor) or output.grad_fn is None or self.batched(output):
            return False
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        if any(t.requires_grad and (t.grad_fn, t.output_nr) not in self.derived for t in inputs):
            return False
        if any(t.grad_fn is not None for t in inputs):
            return False  # derived inputs to a module: not replayed (rare), recorded as usual
        self.derived[(output.grad_fn, output.output_nr)] = Derived(
            module=module, args=_detached(args), kwargs=_detached(kwargs)
        )
        return True


def _constants(leaves: list, slots: list) -> list:
    """The leaves as a replay needs them: constants kept (tensors detached), others None."""
    return [
        (t.detach() if isinstance(t, Tensor) else t) if kind == CONST else None
        for t, (kind, _) in zip(leaves, slots)
    ]


def _dense(t: Tensor) -> Tensor:
    expanded = any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape))
    return t.detach().contiguous() if expanded else t


def _detached(obj: Any) -> Any:
    return torch.utils._pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, obj)


def refuse(out: Tensor, call: Call, in_shape: tuple, batch: int | None) -> None:
    """Make the backward pass through ``out`` raise for every extension: ``call`` took the
    batch (axis 0, size ``batch``) and returned a tensor without it."""
    name, shape = func_name(call.func), tuple(out.shape)
    out.grad_fn.register_prehook(partial(_refuse, name, in_shape, shape, batch))


def _refuse(name: str, in_shape: tuple, shape: tuple, batch: int, grads: tuple) -> None:
    exts = STATE.extensions
    if not exts:
        return
    raise NotImplementedError(
        f"{', '.join(type(e).__name__ for e in exts)}: the call {name} between extended modules "
        f"takes a tensor of shape {in_shape} with the batch ({batch} samples) on axis 0 and "
        f"returns one of shape {shape} without it (it mixes or moves the samples), so "
        "per-sample quantities and curvature cannot follow it. Keep the batch on axis 0 of "
        "every tensor between modules (e.g. batch_first=True), and mix samples only in the loss."
    )


def root_pre_hook(module: Module, args: tuple, kwargs: dict) -> None:
    """Start recording function calls for the forward pass of an extended model."""
    session = STATE.session
    if session is not None:
        session.roots += 1
        return
    if not STATE.store_io or not torch.is_grad_enabled() or _tp.in_functorch_transform():
        return
    if torch.compiler.is_compiling():
        return
    first = next((t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)), None)
    batch = first.shape[0] if first is not None and first.dim() > 0 else None
    session = Session(batch)
    session.__enter__()
    STATE.session = session


def root_hook(module: Module, args: tuple, kwargs: dict, output: Any) -> None:
    """End the recording started by ``root_pre_hook`` (also when the forward raised)."""
    session = STATE.session
    if session is None:
        return
    session.roots -= 1
    if session.roots == 0:
        STATE.session = None
        if session.depth:  # a module's forward raised: the mode may be off the stack
            session.depth = 1
            session.exit_module()
        session.__exit__(None, None, None)

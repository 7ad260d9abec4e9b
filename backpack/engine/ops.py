"""Record the torch function calls made between extended modules during the extended model's
forward pass, so that second-order quantities flow through functional code (residual
additions, ``view``/``permute``, ``torch.cat``, ``F.gelu``, attention written with ``matmul``)
and parameters read outside leaf modules (a class token, a layer scale) get every quantity.

``extend(model)`` gives the model (the root) a forward pre-hook that starts a ``Session``: a
``TorchFunctionMode`` that sees every torch function call until the root's forward returns.
Calls inside extended modules are theirs (the session steps off the mode stack while one
runs). A call on tensors that flow in the graph becomes the record of an ``Op``
(``backpack.derivatives.ops``) with its own autograd-node hook, exactly like a module call.
Calls on parameters and constants alone without the batch axis are derived: their ``Call`` is
replayed in the calls that read them.

The batch size is the leading size of the root's first tensor argument (or the batch axis of a
first sequence-first layer), and each tensor's batch axis is tracked (``axes``): computed
through permutations, else the one axis of the batch's size. A call that reduces, scans or
sorts along it (``h - h.mean(0)``), or drops it, and a module that receives it elsewhere than
on its rule's axis, break the per-sample structure: their backward raises for every extension.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Module, Parameter
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

import backpack._torch_private as _tp
from backpack._state import STATE
from backpack.derivatives.ops import (
    CONST,
    DERIVED,
    IN,
    PARAM,
    Call,
    Merge,
    Op,
    func_name,
    is_inplace,
)
from backpack.derivatives.ops import merged_rows as _merged_rows
from backpack.engine.driver import _on_output_grad
from backpack.engine.record import _Record, tie

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
        self.seen_module = False  # whether an extended module ran (``module_output``)
        self.derived: dict[tuple, Call] = {}  # (node, output index) -> its replay
        self.axes: dict[tuple, int | None] = {}  # (node, output index) -> batch axis

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):
        kwargs = kwargs or {}
        if self.depth or not torch.is_grad_enabled() or _tp.in_functorch_transform():
            # inside an extended module whose mode could not step aside, grad off, torch.func
            return func(*args, **kwargs)
        leaves, spec = tree_flatten((args, kwargs))
        if not any(isinstance(t, Tensor) and t.requires_grad for t in leaves):
            return func(*args, **kwargs)
        if func is F.dropout:
            mask = _dropout_mask(*args, **kwargs)
            if mask is not None:  # an exact product with a recorded mask, replayed as such
                return self.__torch_function__(torch.mul, types, (args[0], mask))
        slots, keys, axes = self._sort(leaves)
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
            self._record(call, t, keys, leaves, before, axes)
        return out

    def _sort(self, leaves: list) -> tuple[list, tuple, list]:
        """The kind of each leaf, the autograd keys and the batch axes of the inputs that flow
        in (read before the call: an in-place call changes its input's node)."""
        slots: list = []
        keys = []
        axes = []
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
                    axes.append(self.axis_of(t, key))
            elif t.requires_grad and isinstance(t, Parameter):
                slots.append((PARAM, t))
            elif t.requires_grad:  # a leaf input that requires grad: flows in, no key
                slots.append((IN, None))
                keys.append(None)
                axes.append(self.axis_of(t, None))
            else:
                slots.append((CONST, None))
        return slots, tuple(keys), axes

    def _record(
        self, call: Call, out: Tensor, in_keys: tuple, leaves: list, before: Tensor | None,
        axes: list,
    ) -> None:  # fmt: skip
        xs = tuple(t for t, (kind, _) in zip(leaves, call.slots) if kind == IN)
        if before is not None and call.slots[0][0] == IN:
            xs = (before, *xs[1:])
        # expanded inputs (``cls.expand(n, -1, -1)``) as dense copies: forward-mode AD (the
        # Hessian residuals) cannot attach a tangent to overlapping memory
        xs = tuple(_dense(x) for x in xs)
        key = (out.grad_fn, out.output_nr)
        if not xs and not self.batched(out):  # parameters and constants only
            self.derived[key] = call
            return
        if call.func in _RANDOM:
            refuse(out, _between(call), "draws random numbers, which a replay would not "
                   "reproduce", True)  # fmt: skip
            return
        known = [(x, a) for x, a in zip(xs, axes) if a is not None]
        x, a = known[0] if known else (None, None)
        if x is not None and _over_axis(call, a, x.dim()):
            refuse(out, _between(call), f"works along the batch axis {a} of its input "
                   f"{tuple(x.shape)}, mixing the samples", False)  # fmt: skip
            return
        out_axis = 0 if self.batched(out) else None
        if x is not None:
            out_axis = _out_axis(call, x, a, out)
        module: Op
        if x is not None and out_axis is None:
            k = None
            if getattr(call.func, "__name__", "") in _VIEWS and len(xs) == 1 and a == 0:
                k = _merged_rows(tuple(x.shape), tuple(out.shape))
            if k is None:
                refuse(out, _between(call), f"takes a tensor of shape {tuple(x.shape)} "
                       f"with the batch on axis {a} and returns one without it", False)  # fmt: skip
                return
            module = Merge(call, k)
        else:
            module = Op(call)
            if module.call.params() and (out_axis != 0 or any(b not in (0, None) for b in axes)):
                refuse(out, _between(call), "reads parameters where the batch is not on "
                       "axis 0", False)  # fmt: skip
                return
        self.axes[key] = out_axis
        if module.call.params():  # a parameter also used elsewhere: sum every use
            tie([module])
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

    def track(self, output: Any, axis: int) -> None:
        """The batch axis of a module's (first) output: ``axis``, its rule's."""
        t = output
        if not isinstance(t, Tensor):
            t = next((x for x in tree_flatten(output)[0] if isinstance(x, Tensor)), None)
        if t is not None and t.grad_fn is not None and t.dim() > axis:
            self.axes[(t.grad_fn, t.output_nr)] = axis

    def axis_of(self, t: Tensor, key: tuple | None) -> int | None:
        """The batch axis of an input: tracked, else the one axis of the batch's size (None:
        unknown, or several)."""
        if key is not None and key in self.axes:
            return self.axes[key]
        if self.batch is None:
            return 0
        axes = [i for i, s in enumerate(t.shape) if s == self.batch]
        return axes[0] if len(axes) == 1 else None

    def broadcast(self, t: Tensor) -> bool:
        """Whether ``t`` has size one where the batch goes, the batch being larger."""
        return self.batch is not None and self.batch > 1 and t.dim() > 0 and t.shape[0] == 1

    def batched(self, t: Tensor) -> bool:
        """Whether ``t`` has the batch axis first (always, where the batch size is unknown)."""
        return self.batch is None or (t.dim() > 0 and t.shape[0] == self.batch)

    def module_output(
        self, module: Module, args: tuple, kwargs: dict, output: Any, expected: int
    ) -> bool:
        """A call of an extended module whose rule has the batch on axis ``expected``. A first
        sequence-first layer sets the batch size; an input with the batch elsewhere gets a
        refusing hook; a call on parameters and constants only, whose output has size one
        where the batch goes (position embeddings of ids ``[1, T]``, broadcast over the batch),
        makes its output derived (replayed by its users), also where its inputs are derived.

        Returns:
            Whether the call is not to be recorded as the module's (derived, or refused).
        """
        if not self.seen_module:  # a sequence-first layer (batch axis 1) tells the batch size
            self.seen_module = True
            x = args[0] if args and isinstance(args[0], Tensor) else None
            if expected and x is not None and x.dim() > expected:
                self.batch = x.shape[expected]
                self.axes.clear()
        x = next((t for t in args if isinstance(t, Tensor) and t.grad_fn is not None), None)
        a = self.axes.get((x.grad_fn, x.output_nr), expected) if x is not None else expected
        if a is not None and a != expected and isinstance(output, Tensor) and output.grad_fn:
            refuse(output, f"the module {module}", f"expects the batch on axis {expected} of its "
                   f"input, which has it on axis {a}", False)  # fmt: skip
            return True
        if not isinstance(output, Tensor) or output.grad_fn is None or not self.broadcast(output):
            return False
        leaves, spec = tree_flatten((args, kwargs))
        slots, _, _ = self._sort(leaves)
        if any(kind == IN for kind, _ in slots):
            return False  # data flows in: a call of the module as any other
        call = Call(None, spec, _constants(leaves, slots), slots, module=module)
        self.derived[(output.grad_fn, output.output_nr)] = call
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


def refuse(out: Tensor, name: str, why: str, second_order_only: bool) -> None:
    """Make the backward pass through ``out`` raise for every extension (or only the
    second-order ones): the call or module ``name`` does what ``why`` says."""
    hook = partial(_refuse, name, why, tuple(out.shape), second_order_only)
    out.grad_fn.register_prehook(hook)


def _between(call: Call) -> str:
    return f"the call {func_name(call.func)} between extended modules"


def _refuse(name: str, why: str, shape: tuple, second_order_only: bool, grads: tuple) -> None:
    exts = [e for e in STATE.extensions if e.stream is not None or not second_order_only]
    if not exts:
        return
    remedy = (
        "Keep the batch on one axis of every tensor between modules (axis 0 where a layer "
        "expects it, e.g. batch_first=True), and mix samples only in the loss."
        if not second_order_only
        else "Call model.eval(), or use a module (nn.Dropout) whose rule keeps its mask."
    )
    raise NotImplementedError(
        f"{', '.join(type(e).__name__ for e in exts)}: {name} (output shape {shape}) {why}, "
        f"so per-sample quantities and curvature cannot follow it. {remedy}"
    )


def _dropout_mask(x: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False):
    """The scaled mask ``bernoulli(1 - p) / (1 - p)`` of an active ``F.dropout``, else None."""
    if not training or p == 0 or inplace or not isinstance(x, Tensor):
        return None
    if p == 1:
        return torch.zeros_like(x)
    return torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)


# functions whose replay would draw new random numbers (F.dropout: in place only, else its mask
# is recorded, ``_dropout_mask``)
_RANDOM = frozenset(
    (F.dropout, F.alpha_dropout, F.feature_alpha_dropout, F.dropout1d, F.dropout2d, F.dropout3d,
     F.rrelu, F.gumbel_softmax, torch.bernoulli, torch.Tensor.bernoulli, torch.Tensor.bernoulli_,
     torch.rrelu, torch.dropout, torch.alpha_dropout, torch.feature_dropout)
)  # fmt: skip
# functions taking axes that keep the tensor's shape: on the batch axis they mix or move samples
_AXIS_FUNCS = frozenset(
    ("flip", "roll", "cumsum",
     "cumprod", "cummax", "cummin", "logcumsumexp", "sort", "argsort", "softmax", "log_softmax",
     "softmin", "narrow", "index_select", "gather", "scatter", "take_along_dim")
)  # fmt: skip
# reductions: every integer argument is an axis (one reduced over the batch mixes samples)
_REDUCTIONS = frozenset(
    ("sum", "mean", "nansum", "nanmean", "prod", "amax", "amin", "max", "min", "std", "var",
     "std_mean", "var_mean", "logsumexp", "median", "nanmedian", "all", "any", "count_nonzero")
)  # fmt: skip


_PERMUTES = frozenset(("permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t"))


def _ints(values: Any) -> list[int]:
    flat = [v for x in values for v in (x if isinstance(x, (tuple, list)) else (x,))]
    return [v for v in flat if isinstance(v, int) and not isinstance(v, bool)]


def _over_axis(call: Call, a: int, ndim: int) -> bool:
    """Whether ``call`` works along axis ``a`` (the batch) of its first input while keeping
    shapes (a scan, softmax or sort over the batch, ``F.batch_norm`` with batch statistics) or
    reduces over it: the shapes alone would miss it where two sizes coincide."""
    func, name = call.func, getattr(call.func, "__name__", "")
    args, kwargs = _call_args(call)
    if func is F.batch_norm:
        return bool(kwargs.get("training", args[5] if len(args) > 5 else False))
    if name not in _AXIS_FUNCS and name not in _REDUCTIONS:
        return False
    ints = _ints([*args[1:], *(v for k, v in kwargs.items() if k in _AXIS_KWARGS)])
    if name == "roll":  # roll(x, shifts, dims): the axes follow the shifts
        dims = kwargs.get("dims", args[2] if len(args) > 2 else None)
        return dims is None or a in [d % ndim for d in _ints([dims])]
    if name in _REDUCTIONS or name == "flip":
        return a in [d % ndim for d in ints]
    return bool(ints) and ints[0] % ndim == a  # the axis comes first


def _out_axis(call: Call, x: Tensor, a: int, out: Tensor) -> int | None:
    """The batch axis of ``out`` given axis ``a`` of the input ``x`` (None: dropped): computed
    for permutations, else the one axis of the batch's size, else the one where the axes
    before it hold as many entries as before ``a`` (elementwise, broadcasting, reshapes)."""
    n, nd, name = x.shape[a], x.dim(), getattr(call.func, "__name__", "")
    if name in _PERMUTES and out.dim() == nd:
        args, kwargs = _call_args(call)
        order = _permutation(name, nd, _ints([*args[1:], *kwargs.values()]))
        if order is not None:
            return order.index(a)
    cands = [i for i, s in enumerate(out.shape) if s == n]
    if len(cands) <= 1:
        return cands[0] if cands else None
    shifted = a + out.dim() - nd
    if name not in _VIEWS and 0 <= shifted < out.dim() and out.shape[shifted] == n:
        return shifted
    before = math.prod(x.shape[:a])
    return next((j for j in cands if math.prod(out.shape[:j]) == before), cands[0])


def _permutation(name: str, nd: int, ints: list[int]) -> list[int] | None:
    """``order[j]``: the input axis at output axis ``j`` of a permuting call."""
    ints = [i % nd for i in ints]
    order = list(range(nd))
    if name == "permute" and len(ints) == nd:
        return ints
    if name == "t":
        return order[::-1] if nd == 2 else order
    if name in ("transpose", "swapaxes", "swapdims") and len(ints) == 2:
        order[ints[0]], order[ints[1]] = order[ints[1]], order[ints[0]]
        return order
    if name in ("movedim", "moveaxis") and len(ints) % 2 == 0 and ints:
        src, dst = ints[: len(ints) // 2], ints[len(ints) // 2 :]
        rest = [i for i in order if i not in src]
        result: list = [None] * nd
        for s, d in zip(src, dst):
            result[d] = s
        it = iter(rest)
        return [next(it) if r is None else r for r in result]
    return None


_AXIS_KWARGS = frozenset(("dim", "dims", "dim0", "dim1", "source", "destination", "axis"))


def _call_args(call: Call) -> tuple[tuple, dict]:
    """The recorded call's ``(args, kwargs)``, None in place of the inputs (axes only)."""
    return tree_unflatten(list(call.leaves), call.spec)


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

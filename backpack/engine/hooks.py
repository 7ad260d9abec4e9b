"""The hooks: ``extend`` adds a forward hook to each module with a rule; each recorded call
registers a hook on the autograd node of its output, which runs the backward driver.

What flows backward between modules is keyed by the autograd node that produced a tensor and
the output index (``_key``), never by tensor object or memory address.
"""

from __future__ import annotations

from functools import partial
from typing import Any
from weakref import WeakSet

import torch
from torch import Tensor
from torch.nn import Module
from torch.utils._pytree import tree_flatten, tree_unflatten

import backpack._torch_private as _tp
from backpack._state import STATE, logger
from backpack.custom_module.graph_utils import convert_module_to_backpack
from backpack.engine.driver import _on_output_grad, _run
from backpack.engine.record import _Record
from backpack.engine.streams import send
from backpack.registry import rule_for

# in-place modules: (input keys, inputs) taken before they run; the inputs are copies where the
# rule reads the input as it was (``Rule.inplace_needs_input``), else None
_PENDING: dict[Module, tuple[tuple, tuple | None]] = {}


def _key(t: Any) -> tuple | None:
    """Identity of a tensor in the autograd graph: (producing node, output index).

    DistributedDataParallel passes the model's outputs through an identity (``_DDPSink``, with
    ``find_unused_parameters`` or ``static_graph``): the key is that of its input, output ``i``
    being the sink's tensor input ``i``.

    Returns:
        ``(node, output index)``, or None for a tensor outside the graph.
    """
    if isinstance(t, Tensor) and t.grad_fn is not None:
        if type(t.grad_fn) is _tp.DDP_SINK_NODE:
            return t.grad_fn.next_functions[t.output_nr]
        return (t.grad_fn, t.output_nr)
    return None


def _keys(args: tuple) -> tuple:
    """Keys of the tensors in ``args``, nested tuples and lists (e.g. RNN states) flattened."""
    if len(args) == 1 and isinstance(args[0], Tensor):  # the common case, fast
        if _tp.view_base(args[0]) is not None:
            _bridge_identity_view(args[0])
        return (_key(args[0]),)
    if any(isinstance(a, (tuple, list)) for a in args):
        args = tree_flatten(args)[0]
    for a in args:
        if isinstance(a, Tensor) and _tp.view_base(a) is not None:
            _bridge_identity_view(a)
    return tuple(map(_key, args))


# view nodes that are the identity when their output has their input's shape
_VIEW_NODES = frozenset(
    ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "SqueezeBackward0",
     "SqueezeBackward1", "SqueezeBackward2", "ExpandBackward0")
)  # fmt: skip


def _bridge_identity_view(t: Tensor) -> None:
    """Second-order quantities reaching ``t``, a view of a tensor of the same shape
    (``f.view(-1, C)`` of an ``[N, C]`` output before the loss, as laplace-torch does; chains
    of such views included), pass on to that tensor unchanged."""
    node, src = t.grad_fn, None
    while type(node).__name__ in _VIEW_NODES and len(node.next_functions) == 1:
        if _tp.saved_self_sizes(node) != tuple(t.shape):
            break
        src = node.next_functions[0]
        node = src[0]
    if src is not None and src[0] is not None:
        # the hook finds its node by _current_autograd_node: binding it would be a leaking cycle
        t.grad_fn.register_prehook(partial(_pass_on, src))


def _pass_on(src: tuple, grads: tuple) -> None:
    flowing = STATE.flowing
    node = _tp.current_node()
    for key in [k for k in flowing if k[1] is node]:  # (stream, node, output index)
        send(flowing, key[0], (src,), [flowing.pop(key)])


def _wants_hook(module: Module) -> bool:
    """Leaves, modules with a rule, and modules with parameters of their own are hooked: those
    ``rule_for`` gives a (registered or automatic) rule.

    Returns:
        Whether ``extend`` hooks ``module``.
    """
    return rule_for(module) is not None


def extend(module: Module, debug: bool = False, use_converter: bool = False) -> Module:
    """Ready ``module`` and its submodules for backpack; returns the same object.

    With ``use_converter=True`` returns a new ``torch.fx.GraphModule`` built from modules with
    rules (``convert_module_to_backpack``); ``module`` itself is left untouched.

    Containers (modules with children and no parameters of their own) are not hooked.
    Idempotent: a module that carries backpack's hook is skipped, whatever its
    ``_backpack_extend`` flag says (clients reset it and extend again); ``remove_hooks``
    (``backpack.context.CTX.remove_hooks()``) takes the hooks off.

    Returns:
        ``module`` itself, or its converted copy with ``use_converter=True``.
    """
    if use_converter:
        module = convert_module_to_backpack(module, debug)
    for m in module.modules():
        if not _wants_hook(m):
            continue
        _EXTENDED.add(m)  # hooked now, or already (also converter copies of hooked modules)
        m._backpack_extend = True
        if _is_hooked(m):
            continue
        if debug:
            logger.info("Extending %s", m)
        m.register_forward_hook(_forward_hook, with_kwargs=True)
        if isinstance(getattr(m, "inplace", None), bool):  # in place now or later (_pre_hook)
            m.register_forward_pre_hook(_pre_hook)
    return module


_EXTENDED: WeakSet[Module] = WeakSet()  # modules that may carry backpack's hooks


def _is_hooked(m: Module) -> bool:
    return any(h is _forward_hook for h in _tp.forward_hook_dicts(m)[0].values())


def remove_hooks() -> None:
    """Take backpack's hooks off every module ``extend`` hooked (BackPACK's
    ``CTX.remove_hooks()``); the ``_backpack_extend`` flags stay, ``extend`` hooks again."""
    for m in list(_EXTENDED):
        forward, pre, with_kwargs = _tp.forward_hook_dicts(m)
        for hooks in (forward, pre):
            for k in [k for k, h in hooks.items() if h is _forward_hook or h is _pre_hook]:
                del hooks[k]
                with_kwargs.pop(k, None)
    _EXTENDED.clear()


def memory_cleanup(module: Module) -> None:
    """Free what ``module`` (not its children) holds of forward passes not yet
    backpropagated with extensions (BackPACK's ``memory_cleanup``): a later backward pass
    with extensions through those calls raises."""
    for record in list(module.__dict__.get("_backpack_calls", ())):
        record.release()


def _pre_hook(module: Module, args: tuple) -> None:
    """Before an in-place call overwrites its input: the input's keys, and a copy of the input
    where the module's rule needs it (``Rule.inplace_needs_input``; PyTorch's autograd copies
    it too for such layers, e.g. ``hardswish_``). The record holds the copy, so it is freed
    with the record after backward."""
    if not module.inplace:
        return None
    if torch.compiler.is_compiling():  # as in _forward_hook
        return torch.compiler.disable(_pre_hook)(module, args)
    if STATE.store_io and torch.is_grad_enabled() and not _tp.in_functorch_transform():
        kept = None
        if rule_for(module).inplace_needs_input:
            kept = tuple(a.detach().clone() if isinstance(a, Tensor) else a for a in args)
        _PENDING[module] = (_keys(args), kept)
    return None


def _forward_hook(module: Module, args: tuple, kwargs: dict, output: Any) -> Any:
    if torch.compiler.is_compiling():  # torch.compile: record eagerly, between two graphs
        return torch.compiler.disable(_forward_hook)(module, args, kwargs, output)
    pending = _PENDING.pop(module, None) if _PENDING else None
    # inside torch.func transforms (a user's vmap/grad, or our own rules) nothing is recorded
    if not STATE.store_io or not torch.is_grad_enabled() or _tp.in_functorch_transform():
        return None
    if pending is None:
        in_keys = _keys(args)
    else:
        in_keys, kept = pending
        args = args if kept is None else kept
    if isinstance(output, Tensor):
        out_key = _key(output)
        if out_key is None or out_key in in_keys:
            return None  # nothing to differentiate, or a pass-through (same autograd value)
        record = _Record(module, args, kwargs, output, in_keys)
        # a pre-hook on the producing node (cheaper than Tensor.register_hook); it is bound to
        # this node, so it sees the output's gradient as it was before later in-place ops
        output.grad_fn.register_prehook(partial(_on_output_grad, record))
        return None
    leaves, spec = tree_flatten(output)
    idx = [i for i, t in enumerate(leaves) if isinstance(t, Tensor) and t.requires_grad]
    if not idx:
        return None
    record = _Record(module, args, kwargs, output, in_keys)
    joined = _Joint.apply(partial(_run, record), *(leaves[i] for i in idx))
    for i, t in zip(idx, joined):
        leaves[i] = t
    return tree_unflatten(leaves, spec)


class _Joint(torch.autograd.Function):
    """Identity on several outputs whose backward sees all their gradients at once."""

    @staticmethod
    def forward(run: Any, *tensors: Tensor) -> tuple[Tensor, ...]:
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        ctx.run = inputs[0]

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple:
        ctx.run(grads)
        return (None, *grads)

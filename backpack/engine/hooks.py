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
from backpack.derivatives.ops import merged_rows, unmerge
from backpack.engine.driver import _on_output_grad, _run
from backpack.engine.factors import LOSS, Factor
from backpack.engine.ops import root_hook, root_pre_hook
from backpack.engine.record import _Record, tie
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
        if args[0].grad_fn is not None and type(args[0].grad_fn).__name__ in _BRIDGED:
            _bridge_view(args[0])
        return (_key(args[0]),)
    if any(isinstance(a, (tuple, list)) for a in args):
        args = tree_flatten(args)[0]
    for a in args:
        if isinstance(a, Tensor) and a.grad_fn and type(a.grad_fn).__name__ in _BRIDGED:
            _bridge_view(a)
    return tuple(map(_key, args))


# view nodes that are the identity when their output has their input's shape
_VIEW_NODES = frozenset(
    ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "SqueezeBackward0",
     "SqueezeBackward1", "SqueezeBackward2", "ExpandBackward0")
)  # fmt: skip
_COPY_NODES = frozenset(("CloneBackward0",))  # reshape of a non-contiguous view: a copy
# nodes of a module input that may begin a chain the bridge passes (``_bridge_view``)
_BRIDGED = _VIEW_NODES | {"SelectBackward0", "SliceBackward0"}


def _bridge_view(t: Tensor) -> None:
    """Second-order quantities reaching ``t``, a view made between the model and the loss,
    pass on to the tensor it views: unchanged through views of the same shape
    (``f.view(-1, C)`` of an ``[N, C]`` output, as laplace-torch does), with each merged row's
    columns kept apart through a view that merges the batch with the axes after it
    (``logits.view(-1, V)`` of ``[N, T, V]``: each token a sample of the loss, ``unmerge``),
    and placed at their index through indexing off the batch axis (``logits[:, -1]``)."""
    if STATE.session is not None:
        return  # inside an extended model's forward: the calls are recorded
    node, src, shape, steps = t.grad_fn, None, tuple(t.shape), []
    while node is not None and len(node.next_functions) == 1:
        step = _view_step(node, shape, any(s[0] is unmerge for s in steps))
        if step is None:
            break
        if step[0] is not None:
            steps.append(step)
        shape = step[-1]
        src = node.next_functions[0]
        node = src[0]
    if src is not None and src[0] is not None:
        # the hook finds its node by _current_autograd_node: binding it would be a leaking cycle
        t.grad_fn.register_prehook(partial(_pass_on, src, steps))


def _view_step(node: Any, shape: tuple, merged: bool) -> tuple | None:
    """One view node between the model and the loss.

    Returns:
        ``(transform, *args, input shape)`` (``transform`` None: the identity), or None where
        the bridge stops.
    """
    indexing = _tp.saved_indexing(node)
    if indexing is not None:
        kind, dim, where, sizes = indexing
        return (_placed, kind, dim, where, sizes) if dim % len(sizes) != 0 else None
    if type(node).__name__ in _COPY_NODES:
        return (None, shape)
    if type(node).__name__ not in _VIEW_NODES:
        return None
    sizes = _tp.saved_self_sizes(node)
    if sizes == shape:
        return (None, sizes)
    k = merged_rows(sizes, shape) if sizes is not None and not merged else None
    return None if k is None else (unmerge, k, sizes)


def _placed(mat: Tensor, kind: str, dim: int, where: Any, sizes: tuple) -> Tensor:
    """``[v, *out] -> [v, *sizes]``: ``mat`` at the selected index (or slice) of axis ``dim``."""
    full = mat.new_zeros(mat.shape[0], *sizes)
    index = where if kind == "select" else slice(*where)
    full[(slice(None),) * (dim + 1) + (index,)] = mat
    return full


def _pass_on(src: tuple, steps: list, grads: tuple) -> None:
    flowing = STATE.flowing
    node = _tp.current_node()
    for key in [k for k in flowing if k[1] is node]:  # (stream, node, output index)
        value = flowing.pop(key)
        if steps:
            value = _through(value, steps, getattr(key[0], "mc_samples", None) is not None)
        send(flowing, key[0], (src,), [value])


def _through(value: Any, steps: list, sampled: bool) -> dict:
    """Factors ``{origin: (sign, [v, *out])}`` through the view steps to the viewed tensor.

    Monte-Carlo columns (``sampled``) pass a merge by a plain reshape
    (``MergeRule.jac_t_sampled``).

    Returns:
        The factors w.r.t. the viewed tensor.

    Raises:
        NotImplementedError: for what flows other than factors (dense blocks, products).
    """
    if not isinstance(value, dict):
        raise NotImplementedError(
            "backpack: a view between the model and the loss that merges the batch with the "
            "next axes or indexes the output is followed by the diagonal, square-root and "
            "Kronecker extensions; this extension's backpropagated quantity cannot pass it. "
            "Do it inside the model's forward pass (extend(model) records it)."
        )
    out = {}
    for o, (s, m) in value.items():
        for f, *args in steps:
            sampled_merge = sampled and f is unmerge and o.kind == LOSS
            m = m.reshape(m.shape[0], *args[-1]) if sampled_merge else f(m, *args)
        out[o] = Factor(s, m)
    return out


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

    Hooked modules owning a common Parameter object (tied weights) sum their contributions
    to it (``record.tie``): tie the weights before ``extend``, or call ``extend`` again after.

    Returns:
        ``module`` itself, or its converted copy with ``use_converter=True``.
    """
    if use_converter:
        module = convert_module_to_backpack(module, debug)
    if rule_for(module) is None and not _is_root(module):
        # a model: record the function calls between its modules (``backpack.engine.ops``)
        module.register_forward_pre_hook(root_pre_hook, with_kwargs=True)
        module.register_forward_hook(root_hook, with_kwargs=True, always_call=True)
        _EXTENDED.add(module)
    hooked = [m for m in module.modules() if _wants_hook(m)]
    tie(hooked)  # modules owning a common Parameter object sum their calls' contributions
    for m in hooked:
        _EXTENDED.add(m)  # hooked now, or already (also converter copies of hooked modules)
        m._backpack_extend = True
        if _is_hooked(m):
            continue
        if debug:
            logger.info("Extending %s", m)
        m.register_forward_hook(_forward_hook, with_kwargs=True)
        m.register_forward_pre_hook(_enter)
        if isinstance(getattr(m, "inplace", None), bool):  # in place now or later (_pre_hook)
            m.register_forward_pre_hook(_pre_hook)
    return module


_EXTENDED: WeakSet[Module] = WeakSet()  # modules that may carry backpack's hooks


def _is_hooked(m: Module) -> bool:
    return any(h is _forward_hook for h in _tp.forward_hook_dicts(m)[0].values())


def _is_root(m: Module) -> bool:
    return any(h is root_hook for h in _tp.forward_hook_dicts(m)[0].values())


def remove_hooks() -> None:
    """Take backpack's hooks off every module ``extend`` hooked (BackPACK's
    ``CTX.remove_hooks()``); the ``_backpack_extend`` flags stay, ``extend`` hooks again."""
    for m in list(_EXTENDED):
        forward, pre, with_kwargs = _tp.forward_hook_dicts(m)
        for hooks in (forward, pre):
            ours = (_forward_hook, _pre_hook, _enter, root_hook, root_pre_hook)
            for k in [k for k, h in hooks.items() if any(h is f for f in ours)]:
                del hooks[k]
                with_kwargs.pop(k, None)
    _EXTENDED.clear()


def memory_cleanup(module: Module) -> None:
    """Free what ``module`` (not its children) holds of forward passes not yet
    backpropagated with extensions (BackPACK's ``memory_cleanup``): a later backward pass
    with extensions through those calls raises."""
    for record in list(module.__dict__.get("_backpack_calls", ())):
        if record.module is module:  # the set may be that of modules with tied parameters
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


def _enter(module: Module, args: tuple) -> None:
    """The function calls inside an extended module are its own (not recorded as ops)."""
    session = STATE.session
    if session is not None:
        session.enter_module()


def _forward_hook(module: Module, args: tuple, kwargs: dict, output: Any) -> Any:
    if torch.compiler.is_compiling():  # torch.compile: record eagerly, between two graphs
        return torch.compiler.disable(_forward_hook)(module, args, kwargs, output)
    session = STATE.session
    if session is None or not session.depth:
        return _record_call(module, args, kwargs, output)
    try:  # the depth drops after the hook: the engine's own tensor calls are not recorded
        if session.depth != 1:
            return _record_call(module, args, kwargs, output)
        axis = rule_for(module).batch_axis(module)
        if session.module_output(module, args, kwargs, output, axis):
            _PENDING.pop(module, None)
            return None  # derived (replayed by its users), or refused
        result = _record_call(module, args, kwargs, output)
        session.track(output if result is None else result, axis)
        return result
    finally:
        session.exit_module()


def _record_call(module: Module, args: tuple, kwargs: dict, output: Any) -> Any:
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

"""The engine: forward hook -> per-call record -> hook on the output's node -> backward driver.

Each forward call of an extended module creates a ``_Record`` (detached inputs and output). It
is referenced only from the pre-hook registered on the autograd node that produced the call's
output, so it lives exactly as long as the autograd graph; the backward driver frees it after
use. What flows backward between modules (second-order extensions) is keyed by the autograd node
that produced a tensor and the output index, never by tensor object or memory address.

A module called several times in one forward pass (its records marked ``shared``) has each
call's linear pieces collected and its quantities stored at the end of the backward pass
(``backpack.extensions.reuse``); other calls take the direct path.
"""

from __future__ import annotations

import gc
from functools import partial
from typing import Any
from weakref import WeakSet

import torch
from torch import Tensor
from torch.autograd.function import BackwardCFunction
from torch.nn import Module
from torch.nn.parallel.distributed import _DDPSink
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from backpack._context import STATE, bound_state, current_state, debug_log, logger
from backpack.derivatives.base import IO, rule_for
from backpack.extensions.base import HANDLED_TYPES, Call
from backpack.extensions.module_extension import run_module_extensions
from backpack.extensions.reuse import Pieces
from backpack.extensions.secondorder.base import run_streams, send

_HOLDING: WeakSet = WeakSet()  # records holding their node, a C++ node (``_drop_dead_nodes``)
_PENDING_KEYS: dict[Module, tuple] = {}  # in-place modules: input keys read before they run
_DDP_SINK = _DDPSink._backward_cls
_in_transform = torch._C._functorch.peek_interpreter_stack  # None outside torch.func transforms


def _drop_dead_nodes() -> None:
    """Free the records whose retained graph the user dropped.

    A record holding the C++ node whose hook holds it is a cycle the collector sees only once
    nothing else holds the node, so a dropped graph would be freed one node per collection
    (upstream nodes are held by downstream ones). Exactly then the node's referents (its hook
    dicts) become visible: dropping the node frees the record, and its upstream nodes in turn.
    """
    while dead := [r for r in _HOLDING if gc.get_referents(r.node)]:
        for r in dead:
            _HOLDING.discard(r)
            r.node = None


class _LiveRecords(WeakSet):
    """The unreleased forward records of one module; copied and pickled empty with the
    module (records belong to the autograd graph of one forward pass)."""

    def __reduce__(self) -> tuple:
        return (type(self), ())


class _Record:
    """What the backward driver needs of one forward call.

    ``shared``: another call of the module was recorded while this one was alive, so both may
    be reached in one backward pass and must sum their contributions (``_collect``); it takes
    that path only if they may (``_reached_twice``), as a live record of an earlier, retained
    graph marks the calls after it too. ``node``: the autograd node that runs this record, kept
    once it ran in a retained graph (for ``_reached_twice``; see ``_drop_dead_nodes``).
    """

    __slots__ = (
        "module", "rule", "io", "graph_inputs", "node", "in_keys", "out_nr", "shared", "state",
        "lowp", "__weakref__",
    )  # fmt: skip

    def __init__(self, module: Module, args: tuple, kwargs: dict, output: Any, in_keys: tuple):
        self.module = module
        # the module's unreleased records (they leave it when released or with their graph);
        # once two are live all are marked, so marking one other suffices
        if _HOLDING:
            _drop_dead_nodes()
        live = module.__dict__.get("_backpack_calls")
        if live is None:
            live = module.__dict__["_backpack_calls"] = _LiveRecords()
        self.shared = bool(live)  # cheap when empty, the common case
        if self.shared:
            next(iter(live)).shared = True
        live.add(self)
        self.out_nr = output.output_nr if isinstance(output, Tensor) else 0
        self.rule = rule_for(module)  # hooked modules always have one (_wants_hook)
        self.state = current_state()  # the backward hooks may run on another thread
        keep_out = self.rule.needs_output or type(module) in HANDLED_TYPES
        # under autocast, what ran in low precision is kept in float32 (the parameters' dtype
        # of a model autocast applies to) so that every product in backward has one dtype
        self.lowp = _autocast_dtype(output)
        # detached: a hook whose closure reaches its own node through a stored tensor (the
        # output, or an input that a later in-place op ties to this call) is a leaking cycle
        inputs = tuple(_detach(a, self.lowp) for a in args)
        out = _detach(output, self.lowp) if keep_out else None
        self.io = IO(inputs, out, kwargs and _detach(kwargs, self.lowp))
        # the inputs as given, for quantities differentiated after backward(create_graph=True):
        # their nodes lie upstream of this call's, so no cycle (parametrised modules are never
        # in place, whose input is their output)
        self.graph_inputs = args if module._parameters or module._modules else None
        if isinstance(output, Tensor):
            self.rule.on_forward(module, self.io, output)
        self.in_keys = in_keys
        self.node = None  # the node running this record, once it ran in a retained graph

    def release(self) -> None:
        self.io = self.graph_inputs = self.node = None
        self.module.__dict__["_backpack_calls"].discard(self)


def _detach(obj: Any, lowp: torch.dtype | None = None) -> Any:
    """``obj``'s tensors detached, those of dtype ``lowp`` (autocast's) cast to float32."""

    def one(t: Any) -> Any:
        if not isinstance(t, Tensor):
            return t
        return t.detach() if t.dtype != lowp else t.detach().float()

    return one(obj) if isinstance(obj, Tensor) else tree_map(one, obj)


def _autocast_dtype(output: Any) -> torch.dtype | None:
    """The low-precision dtype of an autocast region active on ``output``'s device, or None."""
    t = output if isinstance(output, Tensor) else None
    if t is None:
        t = next((x for x in tree_flatten(output)[0] if isinstance(x, Tensor)), None)
    if t is None or not torch.is_autocast_enabled(t.device.type):
        return None
    return torch.get_autocast_dtype(t.device.type)


def _key(t: Any) -> tuple | None:
    """Identity of a tensor in the autograd graph: (producing node, output index).

    DistributedDataParallel passes the model's outputs through an identity (``_DDPSink``, with
    ``find_unused_parameters`` or ``static_graph``): the key is that of its input, output ``i``
    being the sink's tensor input ``i``."""
    if isinstance(t, Tensor) and t.grad_fn is not None:
        if type(t.grad_fn) is _DDP_SINK:
            return t.grad_fn.next_functions[t.output_nr]
        return (t.grad_fn, t.output_nr)
    return None


def _keys(args: tuple) -> tuple:
    """Keys of the tensors in ``args``, nested tuples and lists (e.g. RNN states) flattened."""
    if len(args) == 1 and isinstance(args[0], Tensor):  # the common case, fast
        if args[0]._base is not None:
            _bridge_identity_view(args[0])
        return (_key(args[0]),)
    if any(isinstance(a, (tuple, list)) for a in args):
        args = tree_flatten(args)[0]
    for a in args:
        if isinstance(a, Tensor) and a._base is not None:
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
        if tuple(getattr(node, "_saved_self_sym_sizes", ())) != tuple(t.shape):
            break
        src = node.next_functions[0]
        node = src[0]
    if src is not None and src[0] is not None:
        # the hook finds its node by _current_autograd_node: binding it would be a leaking cycle
        t.grad_fn.register_prehook(partial(_pass_on, src))


def _pass_on(src: tuple, grads: tuple) -> None:
    flowing = STATE.flowing
    node = torch._C._current_autograd_node()
    for key in [k for k in flowing if len(k) == 3 and k[1] is node]:  # (stream, node, nr)
        send(flowing, key[0], (src,), [flowing.pop(key)])


def _wants_hook(module: Module) -> bool:
    """Leaves, modules with a rule, and modules with parameters of their own are hooked: those
    ``rule_for`` gives a (registered or automatic) rule."""
    return rule_for(module) is not None


def extend(module: Module, debug: bool = False, use_converter: bool = False) -> Module:
    """Ready ``module`` and its submodules for backpack; returns the same object.

    With ``use_converter=True`` returns a new ``torch.fx.GraphModule`` built from modules with
    rules (``convert_module_to_backpack``); ``module`` itself is left untouched.

    Containers (modules with children and no parameters of their own) are not hooked.
    Idempotent: a module that carries backpack's hook is skipped, whatever its
    ``_backpack_extend`` flag says (clients reset it and extend again); ``remove_hooks``
    (``backpack.context.CTX.remove_hooks()``) takes the hooks off.
    """
    if use_converter:
        from backpack.custom_module.graph_utils import convert_module_to_backpack

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
        if getattr(m, "inplace", False):
            m.register_forward_pre_hook(_pre_hook)
    return module


_EXTENDED: WeakSet[Module] = WeakSet()  # modules that may carry backpack's hooks


def _is_hooked(m: Module) -> bool:
    return any(h is _forward_hook for h in m._forward_hooks.values())


def remove_hooks() -> None:
    """Take backpack's hooks off every module ``extend`` hooked (BackPACK's
    ``CTX.remove_hooks()``); the ``_backpack_extend`` flags stay, ``extend`` hooks again."""
    for m in list(_EXTENDED):
        for hooks in (m._forward_hooks, m._forward_pre_hooks):
            for k in [k for k, h in hooks.items() if h is _forward_hook or h is _pre_hook]:
                del hooks[k]
                m._forward_hooks_with_kwargs.pop(k, None)
    _EXTENDED.clear()


def memory_cleanup(module: Module) -> None:
    """Free what ``module`` (not its children) holds of forward passes not yet
    backpropagated with extensions (BackPACK's ``memory_cleanup``): a later backward pass
    with extensions through those calls raises."""
    for record in list(module.__dict__.get("_backpack_calls", ())):
        record.release()


def _pre_hook(module: Module, args: tuple) -> None:
    if torch.compiler.is_compiling():  # as in _forward_hook
        return torch.compiler.disable(_pre_hook)(module, args)
    if STATE.store_io and torch.is_grad_enabled():
        _PENDING_KEYS[module] = _keys(args)


def _forward_hook(module: Module, args: tuple, kwargs: dict, output: Any) -> Any:
    if torch.compiler.is_compiling():  # torch.compile: record eagerly, between two graphs
        return torch.compiler.disable(_forward_hook)(module, args, kwargs, output)
    # inside torch.func transforms (a user's vmap/grad, or our own rules) nothing is recorded
    if not STATE.store_io or not torch.is_grad_enabled() or _in_transform() is not None:
        return None
    in_keys = _PENDING_KEYS.pop(module, None) or _keys(args)
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


def _on_output_grad(record: _Record, grads: tuple) -> None:
    grad = grads[record.out_nr]
    if grad is not None:
        _run(record, (grad,))


def _run(record: _Record, grads: tuple[Tensor, ...]) -> None:
    """Backward driver for one module call: run the active extensions of the block of the
    thread that recorded the call, then free the record."""
    if not record.state.extensions:
        if not record.state.retain_graph:
            record.release()
        return
    if record.lowp is not None:  # autocast: gradients of low-precision outputs in float32
        grads = tuple(g.float() if g is not None and g.dtype == record.lowp else g for g in grads)
    if record.state is current_state():
        _run_extensions(record, grads)
    else:  # an autograd worker thread (CUDA)
        with bound_state(record.state):
            _run_extensions(record, grads)


def _run_extensions(record: _Record, grads: tuple[Tensor, ...]) -> None:
    exts = STATE.extensions
    module = record.module
    if record.io is None:
        raise RuntimeError(
            f"backpack: the forward record of {module} was freed by an earlier backward pass "
            "(or memory_cleanup). "
            "To backpropagate through one graph several times with extensions, pass "
            "retain_graph=True to backpack(...) as well as to backward()."
        )
    STATE.modules_run += 1
    _check_batch(record, exts)
    io = _graph_io(record, exts) if torch.is_grad_enabled() else record.io
    call = Call(module, record.rule, io, grads, record.in_keys, record.out_nr, record.lowp)
    exts = run_module_extensions(call, exts, STATE.flowing)  # set_module_extension handlers
    shared = record.shared and bool(call.params()) and _reached_twice(record)
    if shared:
        _collect(call, exts)
    else:
        for ext in exts:
            debug_log(f"Running extension {ext} on {module}")
            if ext.stream is None:
                ext.run(call)
        if any(ext.stream is not None for ext in exts):
            run_streams(call, exts, STATE.flowing)
    if STATE.extension_hook is not None and not shared:
        debug_log(f"Running extension hook on {module}")
        STATE.extension_hook(module)
    record.io.cache.clear()
    if not STATE.retain_graph:
        record.release()
    elif call.params():
        record.node = torch._C._current_autograd_node()
        if not isinstance(record.node, BackwardCFunction):  # _Joint's node holds no cycle
            _HOLDING.add(record)


def _graph_io(record: _Record, exts: tuple) -> IO:
    """The record with graph-attached inputs, inside ``backward(create_graph=True)`` (grad
    mode is on in backward only then): first-order quantities become differentiable.

    Raises:
        NotImplementedError: for second-order extensions, whose quantities are not, and for
            modules whose rule is not ``differentiable``.
    """
    second = [type(e).__name__ for e in exts if e.stream is not None]
    if second:
        raise NotImplementedError(
            f"{', '.join(second)}: backward(create_graph=True) asks for differentiable "
            "quantities, and second-order quantities are not. Run them in a backward pass "
            "without create_graph (first-order extensions support it)."
        )
    if not record.rule.differentiable and record.rule.param_names(record.module):
        raise NotImplementedError(
            f"{', '.join(type(e).__name__ for e in exts)}: backward(create_graph=True) asks for "
            f"differentiable quantities, and the rule of {type(record.module).__name__} computes "
            "them from detached tensors. Run a backward pass without create_graph, or use "
            "torch.func (vmap(grad)) for this model."
        )
    io = record.io
    if record.graph_inputs is None:
        return io
    return IO(record.graph_inputs, io.output, io.kwargs, dict(io.cache))


def _reached_twice(record: _Record) -> bool:
    """Whether another live call of the record's module may run in this backward pass too:
    one was collected in it already, or one whose node is unknown (it never ran in a retained
    graph) or will run. Calls after a record of an earlier, retained graph that this pass does
    not reach take the direct path: summing costs per-sample pieces (``[v, n, *param]`` per
    call for the curvature diagonals; 10x the time of a retain-graph GGN loop)."""
    if STATE.shared_task == torch._C._current_graph_task_id() and record.module in STATE.shared:
        return True
    will_run = torch._C._will_engine_execute_node
    calls = record.module.__dict__["_backpack_calls"]
    return any(r is not record and (r.node is None or will_run(r.node)) for r in calls)


def _check_batch(record: _Record, exts: tuple) -> None:
    """Raise ``ValueError`` for a call on an empty batch (per-sample quantities of no samples,
    and curvature normalised by zero samples, are undefined)."""
    x = record.io.inputs[0] if record.io.inputs else None
    axis = record.rule.batch_axis(record.module)
    if isinstance(x, Tensor) and x.dim() > axis and x.shape[axis] == 0:
        names = ", ".join(type(e).__name__ for e in exts)
        raise ValueError(
            f"{names}: {record.module} received an empty batch (input shape "
            f"{tuple(x.shape)}, batch axis {axis}). Skip empty batches, or run their "
            "backward pass outside the backpack(...) block."
        )


def _collect(call: Call, exts: tuple) -> None:
    """A call of a module called several times: add its pieces; ``_finish`` stores them."""
    task = torch._C._current_graph_task_id()
    if STATE.shared_task != task:  # first shared call of this backward pass
        # a fresh dict: one left by a pass that raised before its end is dropped
        STATE.shared, STATE.shared_task = {}, task
        finish = partial(_finish, STATE.shared, STATE.extension_hook)
        torch.autograd.Variable._execution_engine.queue_callback(finish)
    pieces = STATE.shared.get(call.module)
    if pieces is None:
        for ext in exts:
            if not hasattr(ext, "collect"):
                raise NotImplementedError(
                    f"{type(ext).__name__}: {call.module} is called several times in one "
                    "forward pass, and this extension has no collect/finish methods to sum the "
                    "calls' contributions. Use a separate module per call."
                )
        pieces = Pieces(call.module, call.rule, call.params(), exts)
        STATE.shared[call.module] = pieces
    pieces.calls += 1
    for ext in exts:
        debug_log(f"Collecting {ext} on {call.module} (call {pieces.calls})")
        if ext.stream is None:
            ext.collect(call, pieces)
    if any(ext.stream is not None for ext in exts):
        run_streams(call, exts, STATE.flowing, pieces)


def _finish(shared: dict, hook: Any) -> None:
    """End of the backward pass: the extensions store what the calls of each module summed."""
    for module, pieces in shared.items():
        for ext in pieces.exts:
            debug_log(f"Finishing {ext} on {module} ({pieces.calls} calls)")
            ext.finish(pieces)
        if hook is not None:
            hook(module)
    shared.clear()

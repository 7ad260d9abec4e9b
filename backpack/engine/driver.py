"""The backward driver: at one module call reached in backward, run the active extensions.

A module called several times in one forward pass, or modules owning a common Parameter
object (their records marked ``shared``), have each call's linear pieces collected per group
and their quantities stored at the end of the backward pass (``backpack.engine.reuse``);
other calls take the direct path.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import BackwardCFunction

import backpack._torch_private as _tp
from backpack._state import STATE, bound_state, current_state, debug_log
from backpack.derivatives.base import IO
from backpack.engine.call import Call
from backpack.engine.compat import run_module_extensions
from backpack.engine.record import _HOLDING, _Record
from backpack.engine.reuse import Pieces
from backpack.engine.streams import run_streams


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
        record.node = _tp.current_node()
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
    """Whether another live call of the record's module (or group) may run in this backward
    pass too:
    one was collected in it already, or one whose node is unknown (it never ran in a retained
    graph) or will run. Calls after a record of an earlier, retained graph that this pass does
    not reach take the direct path: summing costs per-sample pieces (``[v, n, *param]`` per
    call for the curvature diagonals; 10x the time of a retain-graph GGN loop)."""
    calls = record.module.__dict__["_backpack_calls"]  # of the module's group (record.tie)
    if STATE.shared_task == _tp.graph_task_id() and calls in STATE.shared:
        return True
    return any(r is not record and (r.node is None or _tp.will_execute(r.node)) for r in calls)


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
    """A call of a module called several times, or of one of modules sharing parameters: add
    its pieces to its group's; ``_finish`` stores them."""
    task = _tp.graph_task_id()
    if STATE.shared_task != task:  # first shared call of this backward pass
        # a fresh dict: one left by a pass that raised before its end is dropped
        STATE.shared, STATE.shared_task = {}, task
        finish = partial(_finish, STATE.shared, STATE.extension_hook)
        _tp.queue_at_backward_end(finish)
    group = call.module.__dict__["_backpack_calls"]
    pieces = STATE.shared.get(group)
    if pieces is None:
        for ext in exts:
            if not hasattr(ext, "collect"):
                raise NotImplementedError(
                    f"{type(ext).__name__}: {call.module} is called several times in one "
                    "forward pass (or shares a Parameter with another module), and this "
                    "extension has no collect/finish methods to sum the calls' contributions. "
                    "Use a separate module (and parameter) per call."
                )
        pieces = Pieces(exts)
        STATE.shared[group] = pieces
    pieces.begin(call)
    for ext in exts:
        debug_log(f"Collecting {ext} on {call.module} (call {pieces.calls})")
        if ext.stream is None:
            ext.collect(call, pieces)
    if any(ext.stream is not None for ext in exts):
        run_streams(call, exts, STATE.flowing, pieces)


def _finish(shared: dict, hook: Any) -> None:
    """End of the backward pass: the extensions store what the calls of each group summed."""
    for pieces in shared.values():
        for ext in pieces.exts:
            debug_log(f"Finishing {ext} on {pieces.modules} ({pieces.calls} calls)")
            ext.finish(pieces)
        if hook is not None:
            for module in pieces.modules:
                hook(module)
    shared.clear()

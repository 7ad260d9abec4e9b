"""Every private PyTorch (and CPython) API backpack relies on, in one place.

Each wrapper says why the public API does not suffice. ``tests/test_torch_private.py`` checks
each one's behaviour, so a torch release that renames or changes one fails there, loudly, rather
than somewhere inside a backward pass. A leaf module: it imports nothing of backpack.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import Node
from torch.nn import Module, functional
from torch.nn.parallel.distributed import _DDPSink

# The node type of DistributedDataParallel's identity on the model's outputs (with
# ``find_unused_parameters`` or ``static_graph``): the engine looks through it to key a
# tensor by the node that really produced it. No public name exists.
DDP_SINK_NODE: type = _DDPSink._backward_cls


def in_functorch_transform() -> bool:
    """Whether the caller runs inside a ``torch.func`` transform (vmap, grad, jvp, ...).

    The forward hook must record nothing there: the rules themselves run modules' forward
    passes under ``vmap``/``jvp``, and so may users. No public query exists.
    """
    return torch._C._functorch.peek_interpreter_stack() is not None


def pop_mode_if_top(mode: Any) -> bool:
    """Take ``mode`` off the torch-function mode stack if it is on top; whether it was.

    While an extended module runs, the recording mode of ``engine.ops`` would see every call
    inside it (its own and the hooks'), only to pass them on: measured 2x the time of an
    idle MLP step. Modes have no public way to step aside for a while and come back.
    """
    n = torch._C._len_torch_function_stack()
    if n and torch._C._get_function_stack_at(n - 1) is mode:
        torch._C._pop_torch_function_stack()
        return True
    return False


def push_mode(mode: Any) -> None:
    """Put back a mode ``pop_mode_if_top`` took off (see there)."""
    torch._C._push_on_torch_function_stack(mode)


def is_functorch_wrapped(t: Tensor) -> bool:
    """Whether ``t`` is a ``torch.func`` wrapper (a batched or dual tensor); the workspace must
    not hand out kept storage for those. No public query exists."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def graph_task_id() -> int:
    """The id of the running backward pass (-1 outside one).

    Identifies "this backward pass" for state that must be reset per pass (the calls of a
    module used several times, the gradient watch, distributed aggregation, the workspace's
    recent passes). Autograd exposes no public pass identity.
    """
    return torch._C._current_graph_task_id()


def queue_at_backward_end(fn: Any) -> None:
    """Run ``fn()`` when the running backward pass has finished every node.

    Quantities summed over several calls of one module can only be stored once every call has
    been reached; there is no public end-of-backward hook (``register_multi_grad_hook`` fires
    per set of tensors, not at the end of the pass).
    """
    torch.autograd.Variable._execution_engine.queue_callback(fn)


def current_node() -> Node | None:
    """The autograd node whose hook is running (None outside backward).

    The engine keys what flows by ``(node, output index)``; inside a node's pre-hook this is
    the node itself. Binding the node into the hook's closure instead would create a reference
    cycle through C++ that leaks every graph.
    """
    return torch._C._current_autograd_node()


def will_execute(node: Node) -> bool:
    """Whether the running backward pass will execute ``node``; decides whether another call
    of a module used several times is reached in this pass (only autograd knows)."""
    return torch._C._will_engine_execute_node(node)


def storage_use_count(storage: torch.UntypedStorage) -> int:
    """How many tensors (and other owners) share ``storage``.

    Lets the workspace and ``BatchGrad`` reuse the memory of a buffer nobody else holds.
    No public API counts the users of a storage.
    """
    return torch._C._storage_Use_Count(storage._cdata)


def refcount(obj: Any) -> int:
    """CPython's reference count of ``obj`` as ``sys.getrefcount`` reports it in the caller
    (this call's own reference not counted): whether a previous result is still referenced
    elsewhere before ``BatchGrad`` overwrites it."""
    return sys.getrefcount(obj) - 1


def saved_indexing(node: Any) -> tuple | None:
    """``("select", dim, index, sizes)`` or ``("slice", dim, (start, end, step), sizes)`` of a
    ``SelectBackward0``/``SliceBackward0`` node (None for other nodes).

    Second-order quantities pass ``logits[:, -1]`` between the model and the loss by these;
    autograd nodes expose what they saved only as private attributes (an index saved as an
    unsigned 64-bit integer: -1 reads as 2**64 - 1).
    """
    kind = type(node).__name__
    if kind not in ("SelectBackward0", "SliceBackward0"):
        return None

    def signed(i: int) -> int:
        return i - (1 << 64) if i >= 1 << 63 else i

    sizes = tuple(node._saved_self_sym_sizes)
    if kind == "SelectBackward0":
        return ("select", node._saved_dim, signed(node._saved_index), sizes)
    span = (signed(node._saved_start), signed(node._saved_end), node._saved_step)
    return ("slice", node._saved_dim, span, sizes)


def view_base(t: Tensor) -> Tensor | None:
    """The tensor ``t`` is a view of (None if it owns its memory); ``Tensor._base``."""
    return t._base


def saved_self_sizes(node: Any) -> tuple[int, ...] | None:
    """The input shape a view node saved (``ViewBackward0`` and kin), None if it saved none.

    Lets the engine see that a view of the same shape is the identity (``f.view(-1, C)``).
    """
    sizes = getattr(node, "_saved_self_sym_sizes", None)
    return None if sizes is None else tuple(sizes)


def saved_argmax(node: Any) -> Tensor | None:
    """The argmax indices a max-pooling node saved (its ``result1``), None if absent; the rule
    reuses them instead of recomputing the pooling."""
    return getattr(node, "_saved_result1", None)


def softmax_dim(name: str, ndim: int) -> int:
    """The axis ``nn.Softmax(dim=None)`` (or ``LogSoftmax``) normalises over, by torch's legacy
    rule for an input of ``ndim`` axes; torch keeps that rule private."""
    return functional._get_softmax_dim(name, ndim, 3)


def forward_hook_dicts(m: Module) -> tuple[dict, dict, dict]:
    """``m``'s forward hooks, forward pre-hooks and the ``with_kwargs`` flags of its hooks.

    ``extend`` must see whether its hook is installed, and ``remove_hooks`` take it off,
    without the handles (modules copied or unpickled keep their hooks, not our handles).
    """
    return m._forward_hooks, m._forward_pre_hooks, m._forward_hooks_with_kwargs

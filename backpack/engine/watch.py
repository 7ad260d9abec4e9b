"""Detect gradient paths that second-order quantities do not see (a regulariser added to the
loss, a parameter also used outside its module).

Second-order extensions backpropagate the loss module's curvature through the extended modules
only. If a parameter's gradient also receives terms from elsewhere (``loss + wd * (w**2).sum()``,
weights used in a functional call), its curvature there is missing. For each parameter of a module
reached by a second-order extension, the gradient along the module's path (``rule.grad``) is summed
over the calls using the parameter (tied weights: of every module owning it) and compared with
the total gradient autograd accumulates; a mismatch warns, naming the parameter and module. The
path gradient costs about one weight-gradient pass, so each module (each group of modules with
tied parameters) is checked in its 1st, 2nd, 4th, 8th, ... backward pass (a regulariser is
usually there from the start), not in every one. The tolerance is relative to the gradient's
scale and grows with the dtype's rounding (bfloat16, float16, autocast): ``max(1e-4, 4 eps)``.
"""

from __future__ import annotations

import warnings
from functools import partial
from weakref import WeakKeyDictionary

import torch
from torch import Tensor

import backpack._torch_private as _tp
from backpack._state import STATE
from backpack.engine.call import Call

# STATE.watched (per thread): parameter -> [summed path gradient, hook handle, module, scale,
# tolerance]; "task" -> the backward pass
_PASSES: WeakKeyDictionary = WeakKeyDictionary()  # group -> (passes seen, last pass, watched)


def watch_gradients(call: Call) -> None:
    """Add the gradient along this call's path to each parameter's expected total."""
    params = call.params()
    if not params:
        return

    task = _tp.graph_task_id()  # the backward pass (a module may run twice in one)
    watched = STATE.watched
    if watched and watched.get("task") != task:  # left by a pass that raised before its end
        _clear(watched)
    # counted per group of modules owning common parameters (``record.tie``): its modules are
    # watched in the same passes, so a tied parameter's path sums every use
    group = call.module.__dict__.get("_backpack_calls", call.module)
    seen, last, watch = _PASSES.get(group, (0, None, False))
    if task != last:
        seen += 1
        watch = not seen & (seen - 1)  # a power of two
        _PASSES[group] = (seen, task, watch)
    if not watch:
        return
    paths = {name: call.rule.grad(call.module, call.io, call.g, name) for name, _ in params}
    # round-off reference: a parameter whose true gradient is zero (a key bias in attention,
    # a bias before BatchNorm) differs from its path by noise on the module's gradient scale
    ref = max(path.abs().max() for path in paths.values())
    for name, param in params:
        tol = _tolerance(call, param)
        if param in watched:
            entry = watched[param]
            entry[0], entry[3] = entry[0] + paths[name], torch.maximum(entry[3], ref)
            entry[4] = max(entry[4], tol)
            continue
        if not watched:
            _tp.queue_at_backward_end(partial(_clear, watched))
            watched["task"] = task
        compare = partial(_compare, watched, param, name)
        watched[param] = [paths[name], param.register_hook(compare), call.module, ref, tol]


def _tolerance(call: Call, param: Tensor) -> float:
    """Relative tolerance: ``1e-4``, or 4 eps of the lowest precision the gradients passed
    through (bfloat16, float16, an autocast region), whichever is larger."""
    dtypes = [param.dtype, *(g.dtype for g in call.grads if g is not None)]
    if call.lowp is not None:
        dtypes.append(call.lowp)
    return max(1e-4, *(4 * torch.finfo(d).eps for d in dtypes if d.is_floating_point))


def _compare(watched: dict, param: Tensor, name: str, total: Tensor) -> None:
    path, handle, module, ref, tol = watched.pop(param)
    handle.remove()
    scale = torch.maximum(total.abs().max(), ref)
    if (total - path).abs().max() > tol * scale + 1e-30:
        warnings.warn(
            f"Parameter '{name}' of {module} receives gradient from outside the path through "
            "the extended loss (a term added to the loss, e.g. a regulariser, or the parameter "
            "used outside its module). Second-order quantities (curvature, Kronecker factors, "
            "square roots) include only the extended loss's part; add regulariser curvature "
            "yourself (e.g. 2 * wd for wd * w.square().sum()).",
            UserWarning,
            stacklevel=2,
        )


def _clear(watched: dict) -> None:
    """End of the backward pass: drop watches whose parameter received no gradient."""
    watched.pop("task", None)
    for entry in watched.values():
        entry[1].remove()
    watched.clear()

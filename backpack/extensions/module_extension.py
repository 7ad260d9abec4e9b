"""BackPACK's per-extension handlers for a module type: ``ext.set_module_extension(cls, handler)``.

A handler replaces the rule of one exact module class for one extension instance. Call
convention (BackPACK 1.7): ``name(ext, module, g_inp, g_out, bp_quantities)`` for each parameter
``name`` in ``params`` returns the value stored as ``module.<name>.<ext.savefield>``;
``backpropagate(ext, module, g_inp, g_out, bp_quantities)`` returns what flows to the input.
``g_out`` is the tuple of output gradients ``(g [n, *out],)``; ``g_inp`` is None (the input
gradient does not exist yet when the module's output gradient arrives). During the calls
``module.input0`` (``input1``, ...) and ``module.output`` hold the detached tensors of the
forward call; they are removed afterwards.

Second-order extensions pass one matrix ``S [v, n, *out]`` as ``bp_quantities`` (``sum_v S S^T``
is the curvature w.r.t. the output); ``backpropagate`` maps it to ``[v, n, *in]`` (a tuple for
several inputs). Factors of several extended losses reach the parameter functions concatenated
along ``v``; signed Hessian factors (DiagHessian) as ``f(positive) - f(negative)``. The module is
treated as linear in its input: a Hessian residual of a curved module needs a ``Rule``.
At a loss module (``nn.modules.loss._Loss``) ``backpropagate`` gets ``bp_quantities=None`` and
returns the square root of the loss Hessian w.r.t. the loss input.
"""

from __future__ import annotations

from typing import Any

from torch.nn import Module

from backpack.engine.call import Extension


class ModuleExtension:
    """The quantities of one extension for one module type (see the module docstring).

    Args:
        params: names of the module's parameters this handler computes a value for; the
            subclass defines a method of each name.

    Raises:
        NotImplementedError: if a name in ``params`` has no method.
    """

    def __init__(self, params: list[str] | None = None):
        self.params = list(params or [])
        missing = [p for p in self.params if not callable(getattr(self, p, None))]
        if missing:
            raise NotImplementedError(
                f"{type(self).__name__} lists params {missing} but defines no method "
                f"`def {missing[0]}(self, ext, module, g_inp, g_out, bp_quantities)`."
            )

    def backpropagate(
        self, ext: Extension, module: Module, g_inp: Any, g_out: tuple, bp_quantities: Any
    ) -> Any:
        """What flows to the module's input(s) given ``bp_quantities`` at its output."""
        raise NotImplementedError(
            f"{type(self).__name__}: {type(ext).__name__} passes a quantity backward through "
            f"{type(module).__name__}; override backpropagate(ext, module, g_inp, g_out, "
            "bp_quantities) to return it for the module's input."
        )

    def check_hyperparameters_module_extension(
        self, ext: Extension, module: Module, g_inp: Any, g_out: tuple
    ) -> None:
        """Raise if ``ext`` is undefined for this module's configuration (default: no check)."""

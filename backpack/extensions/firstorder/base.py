"""Bases of first-order extensions defined by per-module handlers (BackPACK's import path)."""

from __future__ import annotations

import warnings
from typing import Any

from torch.nn import Module

from backpack.engine.call import Call
from backpack.extensions.base import BackpropExtension
from backpack.extensions.module_extension import ModuleExtension

_FAIL_MODES = ("ERROR", "WARNING", "SILENT")


class FirstOrderModuleExtension(ModuleExtension):
    """A handler of a first-order extension: only parameter functions, nothing flows backward."""

    def backpropagate(
        self, ext: BackpropExtension, module: Module, g_inp: Any, g_out: tuple, bp_quantities: Any
    ) -> None:
        """First-order extensions pass nothing backward."""
        return None


class FirstOrderBackpropExtension(BackpropExtension):
    """A first-order extension computed by its handlers ``module_exts`` alone (BackPACK's base
    for user-defined extensions; see ``set_module_extension``).

    Args:
        savefield: attribute under which the handlers' values are stored on each parameter.
        module_exts: ``{module class: FirstOrderModuleExtension}``.
        fail_mode: for a module with trainable parameters and no handler: ``"ERROR"`` raises
            ``NotImplementedError``, ``"WARNING"`` warns, ``"SILENT"`` skips it.
        subsampling: passed to the handlers via ``get_subsampling()``.
    """

    def __init__(
        self,
        savefield: str,
        module_exts: dict[type, ModuleExtension] | None = None,
        fail_mode: str = "WARNING",
        subsampling: list[int] | None = None,
    ):
        assert fail_mode in _FAIL_MODES, f"fail_mode must be one of {_FAIL_MODES}, got {fail_mode}"
        super().__init__(savefield, subsampling, module_exts=module_exts)
        self.fail_mode = fail_mode

    def run(self, call: Call) -> None:
        """Reached only for modules without a handler: report them per ``fail_mode``."""
        if self.fail_mode == "SILENT" or not call.params():
            return
        msg = (
            f"{type(self).__name__} (savefield '{self.savefield}') has no module extension for "
            f"{type(call.module).__name__}; add one with set_module_extension."
        )
        if self.fail_mode == "ERROR":
            raise NotImplementedError(msg)
        warnings.warn(msg, UserWarning, stacklevel=2)

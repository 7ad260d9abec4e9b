"""The extension base class: what an extension declares, and its module-type handlers."""

from __future__ import annotations

from torch.nn import Module

from backpack.derivatives.base import Request
from backpack.engine.call import HANDLED_TYPES, Call
from backpack.extensions.module_extension import ModuleExtension


class BackpropExtension:
    """Base class of all extensions.

    Args:
        savefield: attribute under which results are stored on each parameter.
        subsampling: indices of the samples to compute per-sample quantities for (the scale
            stays that of the full batch).
        module_exts: ``{module class: ModuleExtension}``, handlers that replace the rule of
            that exact class for this extension instance (see ``set_module_extension``).
    """

    stream = None  # what flows backward (second-order extensions); None: output gradient only
    # whether the quantity stays defined where samples couple (BatchNorm with batch
    # statistics): whole-batch curvature does, per-sample quantities do not
    accepts_coupled_samples = False

    def __init__(
        self,
        savefield: str,
        subsampling: list[int] | None = None,
        *,
        module_exts: dict[type, ModuleExtension] | None = None,
    ):
        self.savefield = savefield
        self.subsampling = subsampling
        self.module_exts: dict[type, ModuleExtension] = {}
        for module_cls, extension in (module_exts or {}).items():
            self.set_module_extension(module_cls, extension)

    def set_module_extension(
        self, module_cls: type, extension: ModuleExtension, overwrite: bool = False
    ) -> None:
        """Compute this extension on modules of exactly ``module_cls`` with ``extension``
        (a ``backpack.extensions.module_extension.ModuleExtension``) instead of their rule.

        Raises:
            ValueError: if ``module_cls`` already has a handler and ``overwrite`` is False.
        """
        if module_cls in self.module_exts and not overwrite:
            raise ValueError(
                f"{module_cls} maps to {self.module_exts[module_cls]}! "
                "Use overwrite = True to force replacement."
            )
        self.module_exts[module_cls] = extension
        HANDLED_TYPES.add(module_cls)

    def module_extension_for(self, module: Module) -> ModuleExtension | None:
        """The handler set for the exact class of ``module`` (no subclass matching), or None."""
        return self.module_exts.get(type(module))

    def get_subsampling(self) -> list[int] | None:
        """The sample indices this extension is restricted to (None: all)."""
        return self.subsampling

    @property
    def subsampling_key(self) -> tuple[int, ...] | None:
        """``subsampling`` as a hashable key (None: all samples)."""
        return None if self.subsampling is None else tuple(self.subsampling)

    def expects_backpropagation_quantities(self) -> bool:
        """Whether the extension needs a quantity propagated backward through every layer."""
        return False

    @property
    def request(self) -> Request:
        """What a rule's ``check`` learns of this extension."""
        return Request(type(self).__name__, self.stream is not None, self.subsampling is not None)

    def check_module(self, call: Call) -> None:
        """Raise if this extension is undefined at the module of ``call`` (the rule's checks,
        and coupled samples where the extension does not accept them)."""
        rule = call.rule
        rule.check(call.module, call.io, self.request)
        if not self.accepts_coupled_samples and rule.couples_samples(call.module):
            rule.refuse_coupled(call.module, self.request)

    def run(self, call: Call) -> None:
        """Compute and store this extension's quantities for the module of ``call``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

"""Extension base class and ``Call``, what the engine hands an extension at each module."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.nn import Module, Parameter

from backpack.derivatives.base import IO, Rule

if TYPE_CHECKING:
    from backpack.extensions.module_extension import ModuleExtension

# classes some extension instance has a ModuleExtension for: their calls keep the output
HANDLED_TYPES: set[type] = set()


@dataclass
class Call:
    """One module call reached in backward: its rule, forward record and output gradients."""

    module: Module
    rule: Rule | None
    io: IO
    grads: tuple[Tensor, ...]  # gradients w.r.t. the module's outputs
    in_keys: tuple = ()  # autograd identity of each input: (node, output index) or None
    out_nr: int = 0  # output index of the module's output in its autograd node
    lowp: torch.dtype | None = None  # autocast's dtype in the forward call (None: no autocast)
    _views: dict = field(default_factory=dict)

    @property
    def out_key(self) -> tuple:
        """Autograd identity of the output; valid inside the backward hook only."""
        return (torch._C._current_autograd_node(), self.out_nr)

    @property
    def g(self) -> Any:
        """The output gradient (a tuple for modules with several outputs)."""
        return self.grads[0] if len(self.grads) == 1 else self.grads

    def params(self) -> list[tuple[str, Parameter]]:
        """The parameters the rule owns, ``(name, parameter)``; dotted names reach into children
        a module calls functionally (``nn.MultiheadAttention.out_proj``)."""
        names = self.rule.param_names(self.module) if self.rule else []
        return [(n, self.module.get_parameter(n)) for n in names]

    def view(self, subsampling: list[int] | None) -> tuple[IO, Any]:
        """Record and output gradient restricted to the samples in ``subsampling``."""
        key = None if subsampling is None else tuple(subsampling)
        if key not in self._views:
            if key is None:
                self._views[key] = (self.io, self.g)
            else:
                self._views[key] = self.rule.subsample(self.module, self.io, self.g, list(key))
        return self._views[key]


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

    def run(self, call: Call) -> None:
        """Compute and store this extension's quantities for the module of ``call``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def warn_no_rule(module: Module, ext: BackpropExtension | None, strict: bool, seen: set) -> None:
    """Warn once per module type that ``module`` has no hand-written rule, so that ``ext`` uses
    the automatic rule from ``torch.func`` (``backpack.derivatives.automatic``), a slower one.

    Raises:
        NotImplementedError: in strict mode (``backpack(..., strict=True)``, ``set_strict``).
    """
    kind, ext_name = type(module).__name__, type(ext).__name__ if ext is not None else "backpack"
    remedy = f"Register one with @backpack.register({kind}) on a Rule subclass"
    if strict:
        raise NotImplementedError(
            f"{ext_name}: no rule for module type {kind} ({module}), and strict mode forbids "
            f"the automatic rule. {remedy}, or leave strict mode (backpack(..., strict=False), "
            "backpack.set_strict(False), environment variable BACKPACK_STRICT=0)."
        )
    if (type(module), "automatic") not in seen:
        seen.add((type(module), "automatic"))
        warnings.warn(
            f"{ext_name}: no rule for module type {kind} ({module}); using the automatic rule "
            "from torch.func: correct, but slower (it recomputes the forward pass and builds "
            f"per-sample derivatives densely). {remedy} for speed.",
            UserWarning,
            stacklevel=3,
        )

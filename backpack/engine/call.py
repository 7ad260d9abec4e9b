"""``Call``: what the engine hands an extension at one module call reached in backward."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.nn import Module, Parameter

import backpack._torch_private as _tp
from backpack.derivatives.base import IO, Request, Rule

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
        return (_tp.current_node(), self.out_nr)

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


class Extension(Protocol):
    """What the engine asks of an extension (``backpack.extensions.base.BackpropExtension``)."""

    savefield: str
    subsampling: list[int] | None
    stream: Any  # what flows backward (a ``Stream``); None: the output gradient only
    module_exts: dict[type, Any]  # set_module_extension handlers
    request: Request  # what a rule's ``check`` learns of it

    def run(self, call: Call) -> None:
        """Compute and store the extension's quantities at one module call."""

    def module_extension_for(self, module: Module) -> Any:
        """The ``set_module_extension`` handler for ``type(module)``, or None."""

"""Extension base class and ``Call``, what the engine hands an extension at each module."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module, Parameter

from backpack.derivatives.base import IO, Rule


@dataclass
class Call:
    """One module call reached in backward: its rule, forward record and output gradients."""

    module: Module
    rule: Rule | None
    io: IO
    grads: tuple[Tensor, ...]  # gradients w.r.t. the module's outputs
    in_keys: tuple = ()  # autograd identity of each input: (node, output index) or None
    out_nr: int = 0  # output index of the module's output in its autograd node
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
    """

    stream = None  # what flows backward (second-order extensions); None: output gradient only

    def __init__(self, savefield: str, subsampling: list[int] | None = None):
        self.savefield = savefield
        self.subsampling = subsampling

    def get_subsampling(self) -> list[int] | None:
        """The sample indices this extension is restricted to (None: all)."""
        return self.subsampling

    def expects_backpropagation_quantities(self) -> bool:
        """Whether the extension needs a quantity propagated backward through every layer."""
        return False

    def run(self, call: Call) -> None:
        """Compute and store this extension's quantities for the module of ``call``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def warn_no_rule(module: Module, ext: BackpropExtension, strict: bool, seen: set) -> None:
    """Warn once per (module type, extension) that a parametrised module has no rule.

    Raises:
        NotImplementedError: for second-order extensions (they must pass every module) and in
            strict mode.
    """
    if ext.stream is not None:
        raise NotImplementedError(
            f"{type(ext).__name__}: no rule for module type {type(module).__name__} ({module}), "
            "and second-order quantities must be backpropagated through every module. Register "
            f"one with @backpack.register({type(module).__name__}) on a Rule subclass."
        )
    names = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    if not names:
        return
    msg = (
        f"{type(ext).__name__}: no rule for module type {type(module).__name__} ({module}), "
        f"so its parameters {names} get no '{ext.savefield}'. Register one with "
        f"@backpack.register({type(module).__name__}) on a Rule subclass."
    )
    if strict:
        raise NotImplementedError(msg)
    if (type(module), type(ext)) not in seen:
        seen.add((type(module), type(ext)))
        warnings.warn(msg, UserWarning, stacklevel=3)

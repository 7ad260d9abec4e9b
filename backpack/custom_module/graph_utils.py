"""``convert_module_to_backpack``: rewrite a model with torch.fx into modules with rules.

The user's model is never mutated: every module is shallowly copied (parameters and buffers
shared, names kept), conversions from ``CONVERSIONS`` replace composite layers, the copy is
traced with modules that have a rule (or no children) as leaves, and functional calls
(``+``, ``-``, ``*``, ``torch.cat``, ``view``, slicing, ``F.pad``, ``torch.relu``...) become
modules from ``backpack.custom_module``. In-place layers become copies with ``inplace=False``.
"""

from __future__ import annotations

import copy
import operator
import warnings
from numbers import Number
from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional as F

from backpack.custom_module.branching import SumModule
from backpack.custom_module.conversions import CONVERSIONS
from backpack.custom_module.pad import Pad
from backpack.custom_module.permute import Permute
from backpack.custom_module.scale_module import ScaleModule
from backpack.custom_module.shape import Concat, Reshape
from backpack.custom_module.slicing import Slicing
from backpack.custom_module.transformer import convert_transformer  # noqa: F401 (registers)
from backpack.registry import rule_for

_ACTIVATIONS: dict[Any, type[nn.Module]] = {
    torch.relu: nn.ReLU, F.relu: nn.ReLU, "relu": nn.ReLU, "relu_": nn.ReLU,
    torch.tanh: nn.Tanh, F.tanh: nn.Tanh, "tanh": nn.Tanh,
    torch.sigmoid: nn.Sigmoid, F.sigmoid: nn.Sigmoid, "sigmoid": nn.Sigmoid,
    F.gelu: nn.GELU, F.elu: nn.ELU, F.silu: nn.SiLU,
}  # fmt: skip
_ADD = (operator.add, operator.iadd, torch.add, "add", "add_")
_SUB = (operator.sub, operator.isub, torch.sub, "sub", "sub_")
_MUL = (operator.mul, operator.imul, torch.mul, torch.multiply, "mul", "mul_", "multiply")
_DIV = (operator.truediv, operator.itruediv, torch.div, torch.divide, "div", "div_", "divide")
_RESHAPE = ("view", "reshape", torch.reshape)
_IGNORED = (operator.getitem, "size", getattr, "dim")  # tuple access and shape queries


class BackpackTracer(fx.Tracer):
    """Modules with a rule, and modules without children, are leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        """Modules with a rule, and leaves, stay one node of the traced graph."""
        return rule_for(m) is not None or next(m.children(), None) is None


def _copy(m: nn.Module) -> nn.Module:
    """Shallow copy with its own dicts (children, hooks): parameters stay shared."""
    new = copy.copy(m)
    for k, v in m.__dict__.items():
        if isinstance(v, dict):
            new.__dict__[k] = type(v)(v)
    if getattr(new, "inplace", False):
        new.inplace = False
    return new


def _prepare(m: nn.Module) -> nn.Module:
    """Copy of ``m``'s hierarchy with ``CONVERSIONS`` applied (parameters shared)."""
    if type(m) in CONVERSIONS:
        m = CONVERSIONS[type(m)](m)
    new = _copy(m)
    for name, child in m.named_children():
        new._modules[name] = _prepare(child)
    return new


def convert_module_to_backpack(module: nn.Module, debug: bool = False) -> fx.GraphModule:
    """Equivalent ``GraphModule`` of ``module`` built from modules with rules."""
    root = _prepare(module)
    graph = BackpackTracer().trace(root)
    gm = fx.GraphModule(root, graph, class_name=type(module).__name__)
    _Rewriter(gm, debug).run()
    return gm


class _Rewriter:
    """Replaces functional nodes of ``gm.graph`` by calls of new submodules."""

    def __init__(self, gm: fx.GraphModule, debug: bool):
        self.gm, self.debug, self.count = gm, debug, 0
        self.called: set[str] = set()

    def insert(self, node: fx.Node, module: nn.Module, args: tuple) -> fx.Node:
        """Call ``module`` on ``args`` in place of ``node``."""
        self.count += 1
        name = f"_backpack_{type(module).__name__.lower()}_{self.count}"
        self.gm.add_submodule(name, module)
        with self.gm.graph.inserting_before(node):
            new = self.gm.graph.call_module(name, args)
        node.replace_all_uses_with(new)
        self.gm.graph.erase_node(node)
        if self.debug:
            print(f"backpack converter: {node.format_node()} -> {name} = {module}")
        return new

    def run(self) -> None:
        for node in list(self.gm.graph.nodes):
            if node.op == "call_module":
                self.call_module(node)
            elif node.op in ("call_function", "call_method"):
                self.call_function(node)
        self.gm.graph.lint()
        self.gm.recompile()

    def call_module(self, node: fx.Node) -> None:
        """A parameter-free module called again gets its own copy (one record per call)."""
        m = self.gm.get_submodule(node.target)
        if node.target in self.called and next(m.parameters(), None) is None:
            self.insert(node, _copy(m), node.args)
        self.called.add(node.target)

    def call_function(self, node: fx.Node) -> None:
        f, args = node.target, node.args
        kw = node.kwargs
        nodes = [a for a in args if isinstance(a, fx.Node)]
        other = args[1] if len(args) > 1 else None
        if f in _IGNORED and (f != operator.getitem or isinstance(other, int)):
            return
        if f in _ACTIVATIONS and len(args) == 1 and set(kw) <= {"inplace"}:  # made out-of-place
            self.insert(node, _ACTIVATIONS[f](), args)
        elif f in _ADD and len(nodes) == 2 and len(args) == 2 and not kw:
            self.insert(node, SumModule(), args)
        elif f in _SUB and len(nodes) == 2 and len(args) == 2 and not kw:
            with self.gm.graph.inserting_before(node):
                neg = self.gm.graph.call_function(operator.neg, (args[1],))
            scaled = self.insert(neg, ScaleModule(-1.0), (args[1],))
            self.insert(node, SumModule(), (args[0], scaled))
        elif f in _MUL + _DIV and len(nodes) == 1 and len(args) == 2 and not kw:
            c = args[1] if args[0] is nodes[0] else args[0]
            if isinstance(c, Number) and not (f in _DIV and args[1] is nodes[0]):
                self.insert(node, ScaleModule(1.0 / c if f in _DIV else float(c)), (nodes[0],))
            else:
                self.unmapped(node)
        elif f in (operator.neg, "neg") and len(args) == 1:
            self.insert(node, ScaleModule(-1.0), args)
        elif f is torch.cat:
            tensors, dim = args[0], args[1] if len(args) > 1 else kw.get("dim", 0)
            self.insert(node, Concat(dim), tuple(tensors))
        elif f in (torch.flatten, "flatten"):
            defaults = [kw.get("start_dim", 0), kw.get("end_dim", -1)]
            start, end = [*args[1:], *defaults[len(args) - 1 :]]
            self.insert(node, nn.Flatten(start, end), args[:1])
        elif f in _RESHAPE and len(args) > 2 and all(isinstance(s, int) for s in args[2:]):
            self.insert(node, Reshape(*args[2:]), args[:1])  # args[1]: the batch size
        elif f in ("permute", torch.permute):
            dims = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
            self.insert(node, Permute(*dims), args[:1])
        elif f in ("transpose", torch.transpose) and len(args) == 3:
            self.insert(node, Permute(*args[1:], init_transpose=True), args[:1])
        elif f is operator.getitem:
            index = other if isinstance(other, tuple) else (other,)
            self.insert(node, Slicing(index), args[:1])
        elif f is F.pad:
            self.insert(node, Pad(*args[1:], **kw), args[:1])
        else:
            self.unmapped(node)

    def unmapped(self, node: fx.Node) -> None:
        warnings.warn(
            f"backpack converter: no module for node '{node.name}' ({node.format_node()}); "
            "first-order extensions still work, second-order ones will lack a backpropagated "
            "quantity there.",
            stacklevel=3,
        )

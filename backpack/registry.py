"""The registry: which rule computes the Jacobian products of which module type.

``register`` fills the table (the built-in rules when ``backpack.derivatives`` is imported, users'
rules with ``@backpack.register``); ``rule_for`` reads it, falling back to the automatic rule
that ``backpack.derivatives.automatic`` installs with ``set_fallback``. A leaf module: the rules
import it, it imports no rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.nn import Module

_RULES: dict[type, Any] = {}  # module type -> rule instance (a ``backpack.Rule``)
# "module.QualName" -> rule instance: layers of libraries backpack does not import
_RULES_BY_NAME: dict[str, Any] = {}
_FALLBACK: list[Callable[[Module], Any]] = [lambda module: None]


def register(*module_types: type) -> Callable[[type], type]:
    """Class decorator: use (an instance of) this rule for exactly these module types.

    Users register rules for their own layers the same way; a later registration wins.

    Args:
        *module_types: the module classes (exact type match, no subclasses).

    Returns:
        The decorator, which returns the rule class unchanged.
    """
    return _filling(_RULES, module_types)


def register_by_name(*qualified_names: str) -> Callable[[type], type]:
    """Class decorator: use this rule for the module types named ``"package.module.Class"``
    (layers of other libraries, which backpack does not import).

    Args:
        *qualified_names: ``f"{cls.__module__}.{cls.__qualname__}"`` of each module class.

    Returns:
        The decorator, which returns the rule class unchanged.
    """
    return _filling(_RULES_BY_NAME, qualified_names)


def _filling(table: dict, keys: tuple) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        for key in keys:
            table[key] = cls()
        return cls

    return deco


def rule_for(module: Module) -> Any:
    """The rule registered for ``type(module)`` (exact type match); else the fallback rule
    (``backpack.derivatives.automatic``: a ``torch.func`` rule for losses, leaves and modules
    with parameters of their own, None for containers).

    Returns:
        The rule (a ``backpack.Rule``), or None for a container.
    """
    kind = type(module)
    rule = _RULES.get(kind)
    if rule is None and _RULES_BY_NAME:
        rule = _RULES_BY_NAME.get(f"{kind.__module__}.{kind.__qualname__}")
        if rule is not None:
            _RULES[kind] = rule
    return _FALLBACK[0](module) if rule is None else rule


def set_fallback(fallback: Callable[[Module], Any]) -> None:
    """Make ``fallback(module)`` the rule of modules of unregistered types."""
    _FALLBACK[0] = fallback

"""BackPACK's ``backpack.context.CTX``: the global context, for code written against 1.7."""

from __future__ import annotations

from backpack._state import STATE
from backpack.engine.hooks import remove_hooks
from backpack.extensions.base import BackpropExtension


class CTX:
    """Read the active ``backpack`` block; take the hooks of ``extend`` off all modules."""

    remove_hooks = staticmethod(remove_hooks)

    @staticmethod
    def get_active_exts() -> tuple[BackpropExtension, ...]:
        """The extensions of the active ``backpack(...)`` block (empty outside)."""
        return STATE.extensions

"""Global and per-thread state (a leaf: imports nothing of backpack).

The extensions of the active ``backpack`` block, the ``disable`` switch, strict mode.

Each thread has its own ``_State`` (two threads may run ``backpack(...)`` on their own models at
once). A forward record keeps the state of the thread that ran the forward pass, and the
backward driver binds it (``bound_state``) while it runs: autograd runs the hooks of CUDA
tensors on its own device threads, which must see the block of the thread that entered it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch.nn import Module

logger = logging.getLogger("backpack")


@dataclass
class _State:
    extensions: tuple[Any, ...] = ()  # the block's BackpropExtension instances
    extension_hook: Callable[[Module], None] | None = None
    debug: bool = False
    retain_graph: bool = False
    modules_run: int = 0  # extended modules whose backward ran inside the block
    store_io: bool = True
    strict: bool = False
    batchnorm_contributions: bool = False
    warned: set = field(default_factory=set)  # (module type, extension) pairs warned about
    flowing: dict = field(default_factory=dict)  # (stream, autograd node, output index) -> value
    crosses: dict = field(default_factory=dict)  # KFRA's cross blocks (secondorder.dense)
    shared: dict = field(default_factory=dict)  # group of live records (record.tie) -> Pieces
    shared_task: int = -1  # the backward pass ``shared`` belongs to
    watched: dict = field(default_factory=dict)  # gradient watches of the backward pass
    session: Any = None  # the recording of function calls of a forward pass (engine.ops)


# strict in every thread (set_strict; default from the environment variable BACKPACK_STRICT)
_STRICT_GLOBAL = [os.environ.get("BACKPACK_STRICT", "0") not in ("", "0")]
_LOCAL = threading.local()


def current_state() -> _State:
    """The calling thread's state (created on first use), or the one ``bound_state`` bound."""
    state = getattr(_LOCAL, "state", None)
    if state is None:
        state = _LOCAL.state = _State()
    return state


@contextmanager
def bound_state(state: _State) -> Iterator[None]:
    """Make ``state`` this thread's state inside the block (a backward hook on an autograd
    worker thread runs with the state of the thread that recorded the forward pass)."""
    old = current_state()
    _LOCAL.state = state
    try:
        yield
    finally:
        _LOCAL.state = old


class _ThreadState:
    """``STATE.x`` reads and writes ``x`` of the calling thread's ``_State``."""

    def __getattr__(self, name: str):
        return getattr(current_state(), name)

    def __setattr__(self, name: str, value) -> None:
        setattr(current_state(), name, value)


STATE = _ThreadState()


def set_strict(strict: bool = True) -> None:
    """Strict mode everywhere: modules without a hand-written rule raise instead of using the
    automatic ``torch.func`` rule (with a warning). Default: the environment variable
    ``BACKPACK_STRICT`` (``1``: strict); ``backpack(..., strict=True)`` is strict in its block."""
    _STRICT_GLOBAL[0] = strict


def is_strict() -> bool:
    """Whether modules without a hand-written rule raise (strict block or global switch)."""
    return STATE.strict or _STRICT_GLOBAL[0]


class disable:  # noqa: N801 (BackPACK's public name)
    """Context manager: extended modules store nothing in forward passes run inside it.

    Use it for forward passes that are only differentiated by plain autograd (or never).
    """

    def __enter__(self) -> disable:
        self.old = STATE.store_io
        STATE.store_io = False
        return self

    def __exit__(self, *exc) -> None:
        STATE.store_io = self.old

    @staticmethod
    def should_store_io() -> bool:
        """Whether extended modules currently record their inputs and outputs."""
        return STATE.store_io


def debug_log(msg: str) -> None:
    """Log ``msg`` when the active block has ``debug=True``."""
    if STATE.debug:
        logger.info(msg)

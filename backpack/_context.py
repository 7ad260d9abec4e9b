"""State: the extensions of the active ``backpack`` block and the ``disable`` switch, per thread.

Each thread has its own ``_State`` (two threads may run ``backpack(...)`` on their own models at
once). A forward record keeps the state of the thread that ran the forward pass, and the
backward driver binds it (``bound_state``) while it runs: autograd runs the hooks of CUDA
tensors on its own device threads, which must see the block of the thread that entered it.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch.nn import Module

from backpack.extensions.base import BackpropExtension

logger = logging.getLogger("backpack")


@dataclass
class _State:
    extensions: tuple[BackpropExtension, ...] = ()
    extension_hook: Callable[[Module], None] | None = None
    debug: bool = False
    retain_graph: bool = False
    modules_run: int = 0  # extended modules whose backward ran inside the block
    store_io: bool = True
    strict: bool = False
    batchnorm_contributions: bool = False
    warned: set = field(default_factory=set)  # (module type, extension) pairs warned about
    flowing: dict = field(default_factory=dict)  # (stream, autograd node, output index) -> value
    shared: dict = field(default_factory=dict)  # module called several times -> its Pieces
    shared_task: int = -1  # the backward pass ``shared`` belongs to
    watched: dict = field(default_factory=dict)  # gradient watches of the backward pass


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


def _check_extensions(exts: tuple) -> None:
    """Raise ``ValueError`` for classes, non-extensions and two extensions sharing a savefield."""
    seen: dict[str, BackpropExtension] = {}
    for ext in exts:
        if isinstance(ext, type) and issubclass(ext, BackpropExtension):
            raise ValueError(
                f"backpack(...) received the class {ext.__name__} instead of an instance. "
                f"Instantiate it before passing it to backpack: backpack({ext.__name__}())."
            )
        if not isinstance(ext, BackpropExtension):
            raise ValueError(
                "backpack(...) expects instances of backpack.extensions "
                f"(e.g. BatchGrad()), but received {ext!r}."
            )
        if ext.savefield in seen:
            raise ValueError(
                f"{type(seen[ext.savefield]).__name__} and {type(ext).__name__} both write "
                f"'{ext.savefield}'. Pass only one of them, or give one another savefield."
            )
        seen[ext.savefield] = ext


class backpack:  # noqa: N801 (BackPACK's public name)
    """Context manager: compute ``extensions`` in every backward pass run inside the block.

    Args:
        *exts: extension instances, e.g. ``BatchGrad(), KFAC()``.
        extension_hook: called as ``hook(module)`` once per extended module, after its
            extensions ran (for a module called several times in one forward pass: at the
            end of the backward pass, once its calls' contributions are summed).
        debug: log (logger ``backpack``, level INFO) which extension runs on which module.
        retain_graph: keep each module's forward record after the backward pass, for
            another backward (use with ``loss.backward(retain_graph=True)``).
        strict: raise instead of warning when a module has no hand-written rule (and would
            use the automatic one); see also ``backpack.set_strict``.
        batchnorm_contributions: opt-in for first-order per-sample extensions (BatchGrad,
            BatchL2Grad, SumGradSquared, Variance) through BatchNorm with batch statistics:
            then sample ``n``'s entry is its contribution ``J_n^T g_n`` (``g`` the true,
            coupled output gradient), which sums to ``.grad`` but is not the gradient of
            sample ``n``'s loss (that is undefined: the batch statistics couple the samples).
            Per-sample curvature still raises.
        sync: under ``torch.distributed`` (e.g. ``DistributedDataParallel``), aggregate the
            quantities of each backward pass over the processes so that they equal one
            process's on the concatenated batch (``True``, or ``backpack.distributed.Sync(group,
            gather)`` to choose the group and gather per-sample quantities); see
            ``backpack.distributed``.
    """

    def __init__(
        self,
        *exts: BackpropExtension,
        extension_hook: Callable[[Module], None] | None = None,
        debug: bool = False,
        retain_graph: bool = False,
        strict: bool = False,
        batchnorm_contributions: bool = False,
        sync: bool | Any = False,
    ):
        _check_extensions(exts)
        if sync:
            from backpack.distributed import Sync, SyncObserver

            exts = (*exts, SyncObserver(exts, Sync() if sync is True else sync))
        self.new = dict(
            extensions=tuple(exts),
            extension_hook=extension_hook,
            debug=debug,
            retain_graph=retain_graph,
            strict=strict,
            batchnorm_contributions=batchnorm_contributions,
            modules_run=0,
        )

    def __enter__(self) -> backpack:
        self.old = {k: getattr(STATE, k) for k in (*self.new, "flowing", "shared", "shared_task")}
        for k, v in self.new.items():
            setattr(STATE, k, v)
        STATE.flowing, STATE.shared, STATE.shared_task = {}, {}, -1
        return self

    def __exit__(self, *exc) -> None:
        ran, exts = STATE.modules_run, STATE.extensions
        for k, v in self.old.items():
            setattr(STATE, k, v)
        if exc[0] is None and exts and ran == 0:
            warnings.warn(
                "backpack: no extended module ran a backward pass inside the block, so "
                f"{', '.join(type(e).__name__ for e in exts)} computed nothing. "
                "Call backpack.extend(model) (and extend(lossfunc) for second-order "
                "extensions) before the forward pass, outside torch.no_grad() and disable().",
                UserWarning,
                stacklevel=2,
            )


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

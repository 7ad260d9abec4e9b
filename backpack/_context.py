"""The ``backpack(...)`` block: which extensions run in the backward passes inside it."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from torch.nn import Module

from backpack._state import STATE
from backpack.distributed import Sync, SyncObserver
from backpack.extensions.base import BackpropExtension


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
        per_block = ("flowing", "crosses", "shared", "shared_task")
        self.old = {k: getattr(STATE, k) for k in (*self.new, *per_block)}
        for k, v in self.new.items():
            setattr(STATE, k, v)
        STATE.flowing, STATE.crosses, STATE.shared, STATE.shared_task = {}, {}, {}, -1
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

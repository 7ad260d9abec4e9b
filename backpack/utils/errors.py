"""Checks that raise clear errors for configurations the extensions do not support."""

from __future__ import annotations

import warnings
from typing import Any

from torch.nn import Module


def uses_batch_statistics(module: Module) -> bool:
    """Whether a BatchNorm ``module`` normalises with the current batch's mean and variance.

    As in PyTorch: in training mode, or without running statistics (``track_running_stats=False``).

    Returns:
        Whether batch statistics are used.
    """
    return module.training or module.running_mean is None or module.running_var is None


def batch_norm_raise_error_if_train(
    module: Module, raise_error: bool = True, extension: Any = None
) -> None:
    """Raise ``NotImplementedError`` (or warn) if BatchNorm ``module`` uses batch statistics.

    Batch statistics couple the samples: each output depends on every input of the batch, so
    per-sample gradients (and quantities built from them or from per-sample curvature blocks)
    are undefined.

    Args:
        module: the BatchNorm module.
        raise_error: raise if True, else only warn.
        extension: the extension that asked (or its name), named in the message.
    """
    if not uses_batch_statistics(module):
        return
    name = extension if isinstance(extension, str) else type(extension).__name__
    who = f"{name}: " if extension is not None else ""
    if module.training:
        why, remedy = "is in training mode", "Call model.eval() to use the running statistics"
    else:
        why = "has no running statistics (track_running_stats=False)"
        remedy = "Build it with track_running_stats=True and call model.eval()"
    msg = (
        f"{who}{module} {why}, so it normalises with the statistics of the current batch, "
        "which couples the samples: per-sample gradients (and quantities built from them) are "
        f"not defined. {remedy}, or use a normalisation that acts on each sample alone "
        "(nn.GroupNorm, nn.LayerNorm)."
    )
    if raise_error:
        raise NotImplementedError(msg)
    warnings.warn(msg, UserWarning, stacklevel=2)

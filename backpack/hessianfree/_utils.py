"""Shared helpers: tensor-or-sequence arguments, shape checks, a zero-tolerant ``autograd.grad``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Tensors = Tensor | Sequence[Tensor]


def as_tuple(tensors: Tensors) -> tuple[Tensor, ...]:
    """A single tensor as a 1-tuple, a sequence of tensors as a tuple."""
    return (tensors,) if isinstance(tensors, Tensor) else tuple(tensors)


def check_like(vs: tuple[Tensor, ...], xs: tuple[Tensor, ...], v_name: str, x_name: str) -> None:
    """Raise ``ValueError`` unless ``vs`` has one tensor per ``xs`` entry, of the same shape."""
    if len(vs) != len(xs):
        raise ValueError(f"Expected as many {v_name} as {x_name}, got {len(vs)} and {len(xs)}.")
    for i, (v, x) in enumerate(zip(vs, xs)):
        if v.shape != x.shape:
            raise ValueError(
                f"{v_name}[{i}] has shape {tuple(v.shape)}, but {x_name}[{i}] has {tuple(x.shape)}."
            )


def grad(
    outputs: tuple[Tensor, ...],
    inputs: tuple[Tensor, ...],
    grad_outputs: tuple[Tensor | None, ...],
    *,
    create_graph: bool,
    retain_graph: bool,
) -> tuple[Tensor, ...]:
    """Σ_k grad_outputsₖᵀ ∂outputsₖ/∂inputs, one tensor per input shaped like it.

    Outputs without a graph contribute nothing (``autograd.grad`` would raise), and inputs the
    outputs do not depend on get zeros: curvature products of unused parameters are zero.

    Returns:
        One tensor per input, shaped like it.
    """
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad]
    if not pairs:
        return tuple(torch.zeros_like(x) for x in inputs)
    outs, gouts = zip(*pairs)
    return torch.autograd.grad(
        outs,
        inputs,
        grad_outputs=gouts,
        create_graph=create_graph,
        retain_graph=retain_graph or create_graph,
        allow_unused=True,
        materialize_grads=True,
    )

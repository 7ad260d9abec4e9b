"""Jacobian-vector products (R-operator) by the double-VJP trick."""

from __future__ import annotations

import torch
from torch import Tensor

from backpack.hessianfree._utils import Tensors, as_tuple, check_like, grad


def R_op(
    ys: Tensors, xs: Tensors, vs: Tensors, retain_graph: bool = True, detach: bool = True
) -> tuple[Tensor, ...]:
    """J v: ``(∂ys/∂xs) vs``, one tensor per ``ys`` entry shaped like it.

    Forward mode from two reverse passes: ``g(u) = Jᵀ u`` is linear in a dummy ``u`` (zeros
    requiring grad), so differentiating ``⟨g(u), v⟩`` w.r.t. ``u`` gives ``J v``.

    Args:
        ys: outputs (tensor or sequence) of a graph that depends on ``xs``.
        xs: inputs (tensor or sequence) requiring grad.
        vs: vectors shaped like ``xs``.
        retain_graph: keep the auxiliary graph of ``Jᵀ u`` after the second pass.
        detach: return detached results; if ``False`` they can be differentiated further.

    Returns:
        ``J v`` as a tuple, one entry per ``ys`` entry (zeros where ``ys`` do not depend on ``xs``).

    Raises:
        ValueError: if ``vs`` does not match ``xs`` in number or shapes.
    """  # noqa: DOC502 (check_like raises it)
    ys, xs, vs = as_tuple(ys), as_tuple(xs), as_tuple(vs)
    check_like(vs, xs, "vs", "xs")
    dummies = tuple(torch.zeros_like(y, requires_grad=True) for y in ys)
    jac_t_dummies = grad(ys, xs, dummies, create_graph=True, retain_graph=True)
    return grad(jac_t_dummies, dummies, vs, create_graph=not detach, retain_graph=retain_graph)


jacobian_vector_product = R_op

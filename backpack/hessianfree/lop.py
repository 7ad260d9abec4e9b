"""Transposed Jacobian-vector products (L-operator): one reverse pass."""

from __future__ import annotations

from torch import Tensor

from backpack.hessianfree._utils import Tensors, as_tuple, check_like, grad


def L_op(
    ys: Tensors, xs: Tensors, ws: Tensors, retain_graph: bool = True, detach: bool = True
) -> tuple[Tensor, ...]:
    """vᵀ J: ``Σ_k wsₖᵀ ∂ysₖ/∂xs``, one tensor per ``xs`` entry shaped like it.

    Args:
        ys: outputs (tensor or sequence) of a graph that depends on ``xs``.
        xs: inputs (tensor or sequence) requiring grad.
        ws: vectors shaped like ``ys``.
        retain_graph: keep the graph of ``ys`` for further passes.
        detach: return detached results; if ``False`` they can be differentiated further.

    Returns:
        ``Jᵀ w`` as a tuple, one entry per ``xs`` entry (zeros where ``ys`` do not depend on it).

    Raises:
        ValueError: if ``ws`` does not match ``ys`` in number or shapes.
    """  # noqa: DOC502 (check_like raises it)
    ys, xs, ws = as_tuple(ys), as_tuple(xs), as_tuple(ws)
    check_like(ws, ys, "ws", "ys")
    return grad(ys, xs, ws, create_graph=not detach, retain_graph=retain_graph)


transposed_jacobian_vector_product = L_op

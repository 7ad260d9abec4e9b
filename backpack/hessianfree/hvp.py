"""Hessian-vector products by double backward."""

from __future__ import annotations

from torch import Tensor

from backpack.hessianfree._utils import Tensors, as_tuple, check_like, grad


def hessian_vector_product(
    f: Tensor,
    params: Tensors,
    v: Tensors,
    grad_params: Tensors | None = None,
    detach: bool = True,
) -> tuple[Tensor, ...]:
    """H v: ``∂/∂params Σ_i ⟨∂f/∂paramsᵢ, vᵢ⟩``, one tensor per parameter shaped like it.

    Args:
        f: scalar whose Hessian w.r.t. ``params`` is multiplied.
        params: tensors (or one tensor) requiring grad.
        v: vectors shaped like ``params``.
        grad_params: ``∂f/∂params`` computed with ``create_graph=True``; pass it to reuse it
            across many products (e.g. in CG). Computed here if ``None``.
        detach: return detached results; if ``False`` they can be differentiated further.

    Returns:
        ``H v`` as a tuple (zeros for parameters ``f`` is linear in or independent of).

    Raises:
        ValueError: if ``v`` or ``grad_params`` do not match ``params`` in number or shapes.
    """  # noqa: DOC502 (check_like raises it)
    params, v = as_tuple(params), as_tuple(v)
    check_like(v, params, "v", "params")
    if grad_params is None:
        grad_params = grad((f,), params, (None,), create_graph=True, retain_graph=True)
    else:
        grad_params = as_tuple(grad_params)
        check_like(grad_params, params, "grad_params", "params")
    # the graph stays: callers typically reuse f and grad_params for further products
    return grad(grad_params, params, v, create_graph=not detach, retain_graph=True)

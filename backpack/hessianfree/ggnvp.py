"""Generalized Gauss-Newton-vector products Jᵀ H J v by R-op, Hessian-vector product, L-op."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from backpack.hessianfree._utils import Tensors
from backpack.hessianfree.hvp import hessian_vector_product
from backpack.hessianfree.lop import L_op
from backpack.hessianfree.rop import R_op


def ggn_vector_product(
    loss: Tensor, output: Tensor, model: nn.Module, v: Tensors
) -> tuple[Tensor, ...]:
    """G v = Jᵀ (∂²loss/∂output²) J v over ``model``'s parameters that require grad.

    Args:
        loss: scalar computed from ``output``.
        output: model output, the point where the loss Hessian is taken.
        model: its parameters with ``requires_grad`` (in order) define J.
        v: vectors shaped like those parameters.

    Returns:
        ``G v`` as a tuple, one entry per trainable parameter.
    """
    plist = [p for p in model.parameters() if p.requires_grad]
    return ggn_vector_product_from_plist(loss, output, plist, v)


def ggn_vector_product_from_plist(
    loss: Tensor, output: Tensor, plist: Sequence[Tensor], v: Tensors
) -> tuple[Tensor, ...]:
    """G v = Jᵀ (∂²loss/∂output²) J v, J the Jacobian of ``output`` w.r.t. ``plist``.

    Parameters ``output`` does not depend on get zeros. The graph is kept, so the product can be
    evaluated repeatedly (e.g. in CG).

    Raises:
        ValueError: if ``v`` does not match ``plist`` in number or shapes.

    Returns:
        ``G v``, one tensor per parameter in ``plist``, shaped like it.
    """  # noqa: DOC502 (check_like raises it)
    jac_v = R_op(output, plist, v)
    hess_jac_v = hessian_vector_product(loss, output, jac_v)
    return L_op(output, plist, hess_jac_v)

"""Matrix-free curvature products by pure autograd (no hooks, no ``extend`` needed).

``rop.R_op`` (J v), ``lop.L_op`` (vᵀ J), ``hvp.hessian_vector_product`` (H v) and
``ggnvp.ggn_vector_product`` (Jᵀ H J v) work on any differentiable graph.
"""

from backpack.hessianfree.ggnvp import ggn_vector_product, ggn_vector_product_from_plist
from backpack.hessianfree.hvp import hessian_vector_product
from backpack.hessianfree.lop import L_op, transposed_jacobian_vector_product
from backpack.hessianfree.rop import R_op, jacobian_vector_product

__all__ = [
    "L_op",
    "R_op",
    "ggn_vector_product",
    "ggn_vector_product_from_plist",
    "hessian_vector_product",
    "jacobian_vector_product",
    "transposed_jacobian_vector_product",
]

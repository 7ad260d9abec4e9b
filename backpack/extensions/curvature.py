"""Which curvature matrix a Hessian backpropagation approximates (``HBP``'s ``curv_type``)."""

from __future__ import annotations

from enum import Enum


class Curvature(str, Enum):
    """``HESSIAN`` (exact), ``GGN`` (generalised Gauss-Newton), ``PCH_ABS`` / ``PCH_CLIP``
    (positive-curvature Hessian: absolute value resp. clipping of the residual terms)."""

    HESSIAN = "hessian"
    GGN = "ggn"
    PCH_ABS = "pch-abs"
    PCH_CLIP = "pch-clip"

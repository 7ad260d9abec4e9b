"""The extensions: what to compute in the backward pass, each stored on the parameters."""

from backpack.extensions.base import BackpropExtension
from backpack.extensions.firstorder import BatchGrad, BatchL2Grad, SumGradSquared, Variance
from backpack.extensions.secondorder.curvmatprod import GGNMP, HMP, PCHMP
from backpack.extensions.secondorder.diag_ggn import (
    BatchDiagGGNExact,
    BatchDiagGGNMC,
    DiagGGNExact,
    DiagGGNMC,
)
from backpack.extensions.secondorder.diag_hessian import BatchDiagHessian, DiagHessian
from backpack.extensions.secondorder.hbp import HBP, KFAC, KFLR, KFRA
from backpack.extensions.secondorder.sqrt_ggn import SqrtGGNExact, SqrtGGNMC

__all__ = [
    "BackpropExtension",
    "BatchGrad",
    "BatchL2Grad",
    "SumGradSquared",
    "Variance",
    "DiagGGNExact",
    "DiagGGNMC",
    "BatchDiagGGNExact",
    "BatchDiagGGNMC",
    "DiagHessian",
    "BatchDiagHessian",
    "SqrtGGNExact",
    "SqrtGGNMC",
    "KFAC",
    "KFLR",
    "KFRA",
    "HBP",
    "HMP",
    "GGNMP",
    "PCHMP",
]

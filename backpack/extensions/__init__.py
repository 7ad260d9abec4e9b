"""The extensions: what to compute in the backward pass, each stored on the parameters."""

from backpack.extensions.base import BackpropExtension
from backpack.extensions.firstorder import BatchGrad, BatchL2Grad, SumGradSquared, Variance

__all__ = ["BackpropExtension", "BatchGrad", "BatchL2Grad", "SumGradSquared", "Variance"]

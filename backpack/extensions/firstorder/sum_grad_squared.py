"""Import path of BackPACK: ``backpack.extensions.firstorder.sum_grad_squared.SumGradSquared``."""

from backpack.extensions.firstorder import SumGradSquared

__all__ = ["SumGradSquared"]

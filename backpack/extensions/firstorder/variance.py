"""Import path of BackPACK: ``backpack.extensions.firstorder.variance.Variance``."""

from backpack.extensions.firstorder import Variance

__all__ = ["Variance"]

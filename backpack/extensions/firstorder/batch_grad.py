"""Import path of BackPACK: ``backpack.extensions.firstorder.batch_grad.BatchGrad``."""

from backpack.extensions.firstorder import BatchGrad

__all__ = ["BatchGrad"]

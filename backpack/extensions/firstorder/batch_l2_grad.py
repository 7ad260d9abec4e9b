"""Import path of BackPACK: ``backpack.extensions.firstorder.batch_l2_grad.BatchL2Grad``."""

from backpack.extensions.firstorder import BatchL2Grad

__all__ = ["BatchL2Grad"]

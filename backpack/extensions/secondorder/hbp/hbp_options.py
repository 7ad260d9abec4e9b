"""Options of ``HBP``: how the loss Hessian enters, how it flows backward, which expectation."""

from __future__ import annotations

from enum import Enum


class LossHessianStrategy(str, Enum):
    """``EXACT``: exact square root; ``SAMPLING``: Monte-Carlo square root (sampled targets);
    ``SUM``: the dense sum of the per-sample loss Hessians."""

    EXACT = "exact"
    SAMPLING = "sampling"
    SUM = "sum"


class BackpropStrategy(str, Enum):
    """``SQRT``: backpropagate square-root factors per sample; ``BATCH_AVERAGE``: backpropagate
    one dense batch-averaged block ``(1/N) sum_n J_n^T G J_n``."""

    SQRT = "sqrt"
    BATCH_AVERAGE = "average"


class ExpectationApproximation(str, Enum):
    """``BOTEV_MARTENS``: ``E[J^T H J]`` (KFAC/KFLR/KFRA); ``CHEN``: ``E[J]^T E[H] E[J]``."""

    BOTEV_MARTENS = "E[J^T E(H) J]"
    CHEN = "E(J^T) E(H) E(J)"

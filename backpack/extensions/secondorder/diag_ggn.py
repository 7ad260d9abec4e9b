"""Diagonal of the generalised Gauss-Newton matrix, exact or Monte-Carlo, summed or per sample.

``diag(G) = sum_{v, n} (J_n^T S_n)_v ** 2`` for ``S`` the backpropagated square root of the loss
Hessian (exact: ``c`` columns; MC: ``mc_samples`` sampled columns scaled by ``1/sqrt(M)``).
"""

from __future__ import annotations

from backpack.engine.streams import Stream, mc_draws
from backpack.extensions.secondorder.base import SecondOrderExtension


class _DiagGGN(SecondOrderExtension):
    def __init__(self, savefield: str, mc_samples: int | None, subsampling: list[int] | None):
        super().__init__(savefield, subsampling=subsampling)
        self.stream = Stream(mc_samples, draws=mc_draws(mc_samples, subsampling))


class DiagGGNExact(_DiagGGN):
    """``diag_ggn_exact`` ``[*P]``: the exact GGN diagonal."""

    accepts_coupled_samples = True  # a whole-batch curvature: defined where samples couple

    def __init__(self, subsampling: list[int] | None = None):
        super().__init__("diag_ggn_exact", None, subsampling)


class BatchDiagGGNExact(_DiagGGN):
    """``diag_ggn_exact_batch`` ``[N, *P]``: per-sample exact GGN diagonals (sum = DiagGGNExact)."""

    sum_batch = False

    def __init__(self, subsampling: list[int] | None = None):
        super().__init__("diag_ggn_exact_batch", None, subsampling)


class DiagGGNMC(_DiagGGN):
    """``diag_ggn_mc`` ``[*P]``: MC-Fisher diagonal with ``mc_samples`` sampled targets."""

    accepts_coupled_samples = True  # a whole-batch curvature: defined where samples couple

    def __init__(self, mc_samples: int = 1, subsampling: list[int] | None = None):
        super().__init__("diag_ggn_mc", mc_samples, subsampling)
        self.mc_samples = mc_samples


class BatchDiagGGNMC(_DiagGGN):
    """``diag_ggn_mc_batch`` ``[N, *P]``: per-sample MC GGN diagonals."""

    sum_batch = False

    def __init__(self, mc_samples: int = 1, subsampling: list[int] | None = None):
        super().__init__("diag_ggn_mc_batch", mc_samples, subsampling)
        self.mc_samples = mc_samples

"""Hessian backpropagation with Kronecker-factored results: ``HBP`` and its presets KFAC, KFLR and
KFRA. Layout and scale of the factors: ``backpack.extensions.secondorder.kron``."""

from __future__ import annotations

from typing import Any

from backpack.engine.call import Call
from backpack.engine.reuse import Pieces
from backpack.engine.streams import Stream
from backpack.extensions.curvature import Curvature
from backpack.extensions.secondorder.curvmatprod import _curved_in_params, positive_curvature
from backpack.extensions.secondorder.dense import DenseStream
from backpack.extensions.secondorder.hbp.hbp_options import (
    BackpropStrategy,
    ExpectationApproximation,
    LossHessianStrategy,
)
from backpack.extensions.secondorder.kron import KroneckerExtension

_SUPPORTED = {
    (LossHessianStrategy.SAMPLING, BackpropStrategy.SQRT): "KFAC",
    (LossHessianStrategy.EXACT, BackpropStrategy.SQRT): "KFLR",
    (LossHessianStrategy.SUM, BackpropStrategy.BATCH_AVERAGE): "KFRA",
}


_RESIDUALS = {
    Curvature.GGN: "",
    Curvature.HESSIAN: "hessian",
    Curvature.PCH_CLIP: "clip",
    Curvature.PCH_ABS: "abs",
}


class HBP(KroneckerExtension):
    """Kronecker factors ``[G, A]`` (weights), ``[G]`` (biases) of a curvature, under ``savefield``.

    (loss Hessian, backprop) is one of (SAMPLING, SQRT) = KFAC, (EXACT, SQRT) = KFLR, (SUM,
    BATCH_AVERAGE) = KFRA, with ``ea_strategy=BOTEV_MARTENS``. ``curv_type``: ``GGN``; or
    ``HESSIAN``: ``G`` also holds the curved layers' residuals ``sum_k g_k d2out_k/din2`` (SQRT:
    as signed square-root factors, exact per sample; BATCH_AVERAGE: summed over the samples
    and added to the dense block); ``PCH_CLIP`` / ``PCH_ABS``: those residuals' negative parts
    dropped / counted positive. Enum members or their string values are accepted.

    Args:
        mc_samples: sampled targets per sample for ``SAMPLING``.
        kfac_approx: ``"expand"`` (default) or ``"reduce"`` for Linear inputs with extra dims.

    Raises:
        NotImplementedError: for any other combination.
    """

    def __init__(
        self,
        curv_type: Curvature | str,
        loss_hessian_strategy: LossHessianStrategy | str,
        backprop_strategy: BackpropStrategy | str,
        ea_strategy: ExpectationApproximation | str,
        savefield: str = "hbp",
        *,
        mc_samples: int = 1,
        kfac_approx: str = "expand",
    ):
        curv, loss = Curvature(curv_type), LossHessianStrategy(loss_hessian_strategy)
        backprop, ea = BackpropStrategy(backprop_strategy), ExpectationApproximation(ea_strategy)
        if ea != ExpectationApproximation.BOTEV_MARTENS or (loss, backprop) not in _SUPPORTED:
            presets = ", ".join(
                f"{v} = (GGN, {k[0].name}, {k[1].name}, BOTEV_MARTENS)"
                for k, v in _SUPPORTED.items()
            )
            raise NotImplementedError(
                f"HBP: ({curv.name}, {loss.name}, {backprop.name}, {ea.name}) is not supported; "
                f"supported combinations: {presets}, each also with curv_type HESSIAN, "
                "PCH_CLIP or PCH_ABS."
            )
        residuals = _RESIDUALS[curv]
        if loss == LossHessianStrategy.SUM:
            stream = DenseStream(residuals)
        else:
            mc = mc_samples if loss == LossHessianStrategy.SAMPLING else None
            stream = Stream(mc, residuals=bool(residuals))
        super().__init__(savefield, stream, kfac_approx)
        self.curv_type, self.loss_hessian_strategy = curv, loss
        self.backprop_strategy, self.ea_strategy = backprop, ea
        self.mc_samples = mc_samples

    def store(self, call: Call, flowing: Any) -> None:
        """Store the factors from the square-root factors this curvature uses."""
        super().store(call, self._terms(call, flowing))

    def collect(self, call: Call, pieces: Pieces, flowing: Any) -> None:
        """Add one call's pieces, from the square-root factors this curvature uses."""
        super().collect(call, pieces, self._terms(call, flowing))

    def _terms(self, call: Call, flowing: Any) -> Any:
        """The signed square-root factors this curvature uses (PCH: no negative ones)."""
        if self.curv_type == Curvature.GGN or not call.params():
            return flowing
        if _curved_in_params(call.rule):
            raise NotImplementedError(
                f"HBP with curv_type {self.curv_type.name}: the output of {call.module} may be "
                "curved in its own parameters, whose second derivative Kronecker factors leave "
                "out. Use curv_type GGN, or DiagHessian/HMP for these parameters."
            )
        if isinstance(flowing, dict) and self.curv_type != Curvature.HESSIAN:
            return positive_curvature(flowing, _RESIDUALS[self.curv_type])
        return flowing


class KFAC(HBP):
    """``kfac``: Kronecker factors with ``G`` from the Monte-Carlo square root (``mc_samples``)."""

    def __init__(self, mc_samples: int = 1, kfac_approx: str = "expand"):
        super().__init__(
            Curvature.GGN, LossHessianStrategy.SAMPLING, BackpropStrategy.SQRT,
            ExpectationApproximation.BOTEV_MARTENS, "kfac", mc_samples=mc_samples,
            kfac_approx=kfac_approx,
        )  # fmt: skip


class KFLR(HBP):
    """``kflr``: Kronecker factors with ``G`` from the exact square root of the loss Hessian."""

    def __init__(self, kfac_approx: str = "expand"):
        super().__init__(
            Curvature.GGN, LossHessianStrategy.EXACT, BackpropStrategy.SQRT,
            ExpectationApproximation.BOTEV_MARTENS, "kflr", kfac_approx=kfac_approx,
        )  # fmt: skip


class KFRA(HBP):
    """``kfra``: Kronecker factors with ``G`` from the batch-averaged dense recursion."""

    def __init__(self, kfac_approx: str = "expand"):
        super().__init__(
            Curvature.GGN, LossHessianStrategy.SUM, BackpropStrategy.BATCH_AVERAGE,
            ExpectationApproximation.BOTEV_MARTENS, "kfra", kfac_approx=kfac_approx,
        )  # fmt: skip


__all__ = ["HBP", "KFAC", "KFLR", "KFRA"]

"""Base class of second-order extensions: store a reduction of what their stream brings."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from backpack.engine.call import Call
from backpack.engine.reuse import Pieces
from backpack.engine.streams import _subsample
from backpack.extensions.base import BackpropExtension


class SecondOrderExtension(BackpropExtension):
    """An extension storing, per parameter, a reduction of what its stream brings to a module."""

    def expects_backpropagation_quantities(self) -> bool:
        """Second-order extensions backpropagate factors of the loss Hessian."""
        return True

    sum_batch = True

    def param_value(self, call: Call, io: Any, terms: dict, name: str) -> Tensor:
        """``sum_k sign_k diag(J^T S_k S_k^T J)`` for parameter ``name`` (per sample unless
        ``sum_batch``); ``io`` and ``terms`` possibly subsampled. Override for other reductions.
        Coupled factors give ``sum_v (sum_n J_n^T S_vn)^2`` (whole batch only).

        Returns:
            ``[*param]`` (``[n, *param]`` unless ``sum_batch``).
        """
        module, rule = call.module, call.rule

        def diag(origin: Any, mat: Tensor) -> Tensor:
            if not origin.coupled:
                return rule.param_diag(module, io, mat, name, sum_batch=self.sum_batch)
            if not self.sum_batch or self.subsampling is not None:
                raise _coupled_error(self, module)
            return rule.param_jac_t_mat_prod(module, io, mat, name, sum_batch=True).square().sum(0)

        return sum(sign * diag(o, mat) for o, (sign, mat) in terms.items())

    def store(self, call: Call, flowing: Any) -> None:
        """Store ``param_value`` of each parameter, from the factors ``flowing`` here."""
        self.check_module(call)
        io, flowing = _subsample(call, flowing, self.subsampling, self.stream)
        for name, param in call.params():
            setattr(param, self.savefield, self.param_value(call, io, flowing, name))

    # parameters used by several calls in one forward (a module called several times, tied
    # weights): ``collect`` per call, ``finish`` once per parameter
    def collect(self, call: Call, pieces: Pieces, flowing: Any) -> None:
        """Add one call's linear pieces (see ``add_pieces``, ``add_mixed``) to ``pieces``."""
        self.check_module(call)
        io, flowing = _subsample(call, flowing, self.subsampling, self.stream)
        mixed = {o: t for o, t in flowing.items() if o.mixed}
        if mixed:
            flowing = {o: t for o, t in flowing.items() if not o.mixed}
        for name, _ in call.params():
            self.add_pieces(call, io, flowing, name, pieces)
            if mixed:
                self.add_mixed(call, io, mixed, name, pieces)

    def add_mixed(self, call: Call, io: Any, mixed: dict, name: str, pieces: Pieces) -> None:
        """Pieces of the mixed second derivatives of downstream calls using the parameter."""
        raise NotImplementedError(
            f"{type(self).__name__}: a parameter of {call.module} is used by several calls in "
            "one forward pass (a module called several times, or tied weights) and one call's "
            "input depends on another call's output; the Hessian blocks between such calls "
            "are supported by DiagHessian, BatchDiagHessian, HMP and PCHMP. Use a separate "
            "(untied) parameter per call."
        )

    def finish(self, pieces: Pieces) -> None:
        """Store ``finish_value`` for each parameter the calls used."""
        for pid, param in pieces.params.items():
            setattr(param, self.savefield, self.finish_value(pieces, pid))

    def _jac_t_key(self, pid: int) -> tuple:
        return ("jac_t", self.stream, pid, self.subsampling_key)

    def add_pieces(self, call: Call, io: Any, terms: dict, name: str, pieces: Pieces) -> None:
        """Per origin, ``V = J^T S`` ``[v, n, *P]`` (coupled origins: summed over ``n``,
        ``[v, *P]``); summed over the calls this is the square root of the parameter's block."""
        module, rule = call.module, call.rule

        def jac_t(origin: Any, mat: Tensor) -> Tensor:
            coupled = origin.coupled
            if coupled and (not self.sum_batch or self.subsampling is not None):
                raise _coupled_error(self, module)
            return rule.param_jac_t_mat_prod(module, io, mat, name, sum_batch=coupled)

        pieces.add_terms(self._jac_t_key(pieces.pid(call, name)), terms, jac_t)

    def finish_value(self, pieces: Pieces, pid: int) -> Tensor:
        """``sum_k sign_k sum_v V_kv ** 2`` (per sample unless ``sum_batch``) of the summed
        pieces; an origin that arrived coupled in one call and per sample in another is
        coupled (column ``(v, m)``: ``V_vm`` on sample ``m``).

        Returns:
            ``[*param]`` (``[n, *param]`` unless ``sum_batch``).
        """
        terms = pieces.terms(self._jac_t_key(pid))
        for o in [o for o in terms if o.has_coupled_form_in(terms)]:
            sign, v = terms.pop(o)
            terms[o.as_coupled()] = (sign, terms[o.as_coupled()][1] + v.flatten(0, 1))
        value = 0
        for o, (sign, v) in terms.items():
            squares = v.square().sum(0)
            if self.sum_batch and not o.coupled:
                squares = squares.sum(0)
            value = value + sign * squares
        return value


def _coupled_error(ext: BackpropExtension, module: Any) -> NotImplementedError:
    return NotImplementedError(
        f"{type(ext).__name__}: a layer after {module} couples the samples "
        "(BatchNorm with batch statistics), so per-sample or subsampled curvature "
        "is not defined. Use the whole-batch extension or model.eval()."
    )

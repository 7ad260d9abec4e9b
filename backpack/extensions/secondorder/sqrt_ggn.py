"""Symmetric factorisation of the GGN: ``V [c, n, *P]`` with ``G = sum_{c, n} V_cn V_cn^T``.

``V = J^T S``: the backpropagated square root of the loss Hessian, pushed through the parameter
Jacobian per sample. Exact: one column per model output (``c``; the loss rule's column
convention, e.g. cross-entropy's ``diag(sqrt p) - p sqrt(p)^T``); MC: ``mc_samples`` sampled
columns. Several extended losses concatenate their columns.

BatchNorm with batch statistics (train mode) couples the samples: the GGN block is
``J^T H J`` of the whole batch (``J`` the Jacobian of all outputs), no longer a sum of per-sample
blocks. The layout stays ``[C, N, *P]``: entry ``(c, m)`` is the gradient of the whole batch's
output along column ``c`` of sample ``m``'s loss-Hessian root, ``sum_n J_n^T S_(c,m),n``, so
``sum_{c,m} V_cm V_cm^T = J^T H J`` still holds; without coupling this is the per-sample
``J_m^T S_cm`` as before. Subsampling is undefined then and raises.
"""

from __future__ import annotations

import torch
from torch import Tensor

from backpack.engine.call import Call
from backpack.engine.reuse import Pieces
from backpack.engine.streams import Stream, mc_draws
from backpack.extensions.secondorder.base import SecondOrderExtension, _coupled_error


class _SqrtGGN(SecondOrderExtension):
    accepts_coupled_samples = True  # a whole-batch curvature: defined where samples couple

    def __init__(self, savefield: str, mc_samples: int | None, subsampling: list[int] | None):
        super().__init__(savefield, subsampling=subsampling)
        self.stream = Stream(
            mc_samples, draws=mc_draws(mc_samples, subsampling), stores_columns=True
        )

    def param_value(self, call: Call, io, terms: dict, name: str) -> Tensor:
        """``J^T S`` ``[v, n, *P]`` per origin, concatenated; coupled origins: ``[v, m, *P]``,
        the whole batch's ``sum_n J_n^T S_(v,m),n`` (see the module docstring).

        Raises:
            NotImplementedError: for coupled factors with per-sample or subsampled values.

        Returns:
            ``[sum_k v_k, n, *P]``.
        """  # noqa: DOC501, DOC502 (_coupled_error builds it)
        jac_t, module = call.rule.param_jac_t_mat_prod, call.module
        parts = []
        for origin, (_, m) in terms.items():
            if not origin.coupled:
                parts.append(jac_t(module, io, m, name, sum_batch=False))
            elif self.subsampling is not None:
                raise _coupled_error(self, module)
            else:
                whole = jac_t(module, io, m, name, sum_batch=True)  # [v * m, *P]
                parts.append(whole.unflatten(0, (-1, m.shape[1])))
        return torch.cat(parts)

    def add_pieces(self, call: Call, io, terms: dict, name: str, pieces: Pieces) -> None:
        """``param_value``'s part of each origin, keyed by the origin without its coupling:
        coupled or not, a part is ``[v, n, *P]`` with the same columns, so the calls' add."""
        key = ("sqrt_ggn", *self._jac_t_key(pieces.pid(call, name)))
        for origin, term in terms.items():
            plain = origin.as_plain()
            part = {origin: term}
            pieces.add((*key, plain), lambda p=part: self.param_value(call, io, p, name))

    def finish_value(self, pieces: Pieces, pid: int) -> Tensor:
        """The per-origin sums ``sum_c J_c^T S_c`` of the calls, concatenated."""
        return torch.cat(list(pieces.with_prefix(("sqrt_ggn", *self._jac_t_key(pid))).values()))


class SqrtGGNExact(_SqrtGGN):
    """``sqrt_ggn_exact`` ``[C, N, *P]``: exact factor of the GGN."""

    def __init__(self, subsampling: list[int] | None = None):
        super().__init__("sqrt_ggn_exact", None, subsampling)


class SqrtGGNMC(_SqrtGGN):
    """``sqrt_ggn_mc`` ``[M, N, *P]``: Monte-Carlo factor (targets sampled from the model)."""

    def __init__(self, mc_samples: int = 1, subsampling: list[int] | None = None):
        super().__init__("sqrt_ggn_mc", mc_samples, subsampling)
        self.mc_samples = mc_samples

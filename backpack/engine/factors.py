"""The signed factors that flow backward: ``Factors = {Origin: Factor(sign, S [v, n, *out])}``.

``sum sign S S^T`` over the entries is the curvature w.r.t. the tensor they flow to. Each entry's
``Origin`` names where its columns started: a loss's root of its Hessian, one residual factor of
a curved layer, the mixed second derivatives of a module called several times
(``backpack.engine.reuse``), or a stream's own value (HMP's lazy residuals). Factors of one
origin that reach a tensor along several paths add up; different origins stay separate, their
columns are unrelated. After a layer that couples the samples (BatchNorm with batch
statistics) an origin is ``coupled``: its columns ``[v * n_src, n, ...]`` span every sample.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
from torch import Tensor

LOSS, RESIDUAL, MIXED, OWN = "loss", "residual", "mixed", "own"  # the kinds of origin


@dataclass(frozen=True)
class Origin:
    """Where the columns of a factor started (see the module docstring)."""

    source: int  # id of the forward record of the loss or layer (MIXED: of the module's Pieces)
    part: Any = None  # RESIDUAL: which factor of the layer; MIXED: (parameter name, call)
    kind: str = LOSS
    tag: str | None = None  # a loss's ``Rule.origin_tag`` (see ``Rule.closes_tag``)
    coupled: bool = False  # columns ``[v * n_src, n, ...]`` span every sample

    @property
    def mixed(self) -> bool:
        """Whether the columns are mixed second derivatives of a module called several times."""
        return self.kind == MIXED and not self.coupled

    def as_coupled(self) -> Origin:
        """The origin after a layer that couples the samples."""
        return replace(self, coupled=True)

    def untagged(self) -> Origin:
        """The origin without its loss's tag."""
        return replace(self, tag=None)

    def as_plain(self) -> Origin:
        """The origin before any layer that couples the samples."""
        return replace(self, coupled=False)

    def has_coupled_form_in(self, factors: dict) -> bool:
        """Whether ``factors`` also holds this (per-sample) origin in its coupled form."""
        return not self.coupled and self.as_coupled() in factors


class Factor(NamedTuple):
    """One entry of ``Factors``: ``sign * S S^T`` with ``S [v, n, *out]`` (coupled origins:
    ``[v * n_src, n, *out]``); a stream may flow its own value instead of ``S``."""

    sign: float
    mat: Any


Factors = dict[Origin, Factor]  # what flows to one tensor, per origin


def couple(origin: Origin, mat: Tensor) -> tuple[Origin, Tensor]:
    """Per-sample factor ``[v, n, ...]`` -> coupled ``[v * n, n, ...]``: column ``(v, m)`` is
    ``S_v`` on sample ``m`` and zero elsewhere (costs ``n`` times the memory)."""
    v, n = mat.shape[:2]
    eye = torch.eye(n, dtype=mat.dtype, device=mat.device).view(1, n, n, *[1] * (mat.dim() - 2))
    return origin.as_coupled(), (mat.unsqueeze(1) * eye).reshape(v * n, n, *mat.shape[2:])

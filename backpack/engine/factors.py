"""The signed factors that flow backward: ``{origin: (sign, S [v, n, *out])}``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

COUPLED = "coupled"  # origin-key prefix: columns [v * n_src, n, ...] span every sample


def _is_coupled(origin: Any) -> bool:
    return isinstance(origin, tuple) and origin[0] == COUPLED


def _couple(origin: Any, mat: Tensor) -> tuple[Any, Tensor]:
    """Per-sample factor ``[v, n, ...]`` -> coupled ``[v * n, n, ...]``: column ``(v, m)`` is
    ``S_v`` on sample ``m`` and zero elsewhere (costs ``n`` times the memory)."""
    v, n = mat.shape[:2]
    eye = torch.eye(n, dtype=mat.dtype, device=mat.device).view(1, n, n, *[1] * (mat.dim() - 2))
    return (COUPLED, origin), (mat.unsqueeze(1) * eye).reshape(v * n, n, *mat.shape[2:])

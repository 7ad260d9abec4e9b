"""Layer cases of one family, appended to `tests.cases.LAYER_CASES` (same helpers, same gaps):
per-sample normalisation layers, between parametrised layers so their input Jacobians and
Hessian residuals are exercised."""

from __future__ import annotations

import torch
from torch import nn

from tests.cases import LayerCase, _chain


def _eval_instance_norm() -> nn.Module:
    """InstanceNorm2d tracking running statistics (random ones), used in eval mode."""
    norm = nn.InstanceNorm2d(3, affine=True, track_running_stats=True)
    with torch.no_grad():
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
    return _rand(norm)


def _rand(norm: nn.Module) -> nn.Module:
    """Random affine parameters (the defaults 1 and 0 would hide a misplaced weight)."""
    with torch.no_grad():
        for p in norm.parameters():
            p.normal_()
    return norm


CASES: list[LayerCase] = [
    _chain(
        "Linear-LayerNorm-Tanh", lambda: [nn.Linear(4, 4), _rand(nn.LayerNorm(4)), nn.Tanh()], 5, 4
    ),
    _chain(
        "Linear-LayerNorm2d-nobias",
        lambda: [nn.Linear(4, 4), _rand(nn.LayerNorm((3, 4), bias=False)), nn.Sigmoid()],
        3,
        4,
    ),
    _chain(
        "Linear-LayerNorm-noaffine",
        lambda: [nn.Linear(4, 5), nn.LayerNorm(5, elementwise_affine=False)],
        2,
        4,
    ),
    _chain("Linear-RMSNorm", lambda: [nn.Linear(4, 5), _rand(nn.RMSNorm(5)), nn.Tanh()], 2, 4),
    _chain(
        "Linear-RMSNorm-eps-noaffine",
        lambda: [nn.Linear(4, 5), nn.RMSNorm([2, 5], eps=1e-3, elementwise_affine=False)],
        2,
        4,
    ),
    _chain(
        "Conv2d-GroupNorm",
        lambda: [nn.Conv2d(2, 4, 2), _rand(nn.GroupNorm(2, 4)), nn.Tanh()],
        2,
        4,
        3,
    ),
    _chain(
        "Conv1d-GroupNorm-noaffine",
        lambda: [nn.Conv1d(2, 6, 2), nn.GroupNorm(3, 6, affine=False)],
        2,
        5,
    ),
    _chain(
        "Conv2d-InstanceNorm2d-affine",
        lambda: [nn.Conv2d(2, 3, 2), _rand(nn.InstanceNorm2d(3, affine=True)), nn.Tanh()],
        2,
        4,
        3,
    ),
    _chain("Conv1d-InstanceNorm1d", lambda: [nn.Conv1d(2, 3, 2), nn.InstanceNorm1d(3)], 2, 5),
    _chain(
        "Conv3d-InstanceNorm3d-affine",
        lambda: [nn.Conv3d(1, 2, 2), _rand(nn.InstanceNorm3d(2, affine=True))],
        1,
        3,
        3,
        3,
    ),
    _chain(
        "Conv2d-InstanceNorm2d-running",
        lambda: [nn.Conv2d(2, 3, 2), _eval_instance_norm()],
        2,
        4,
        3,
    ),
]
GAPS: dict[str, str] = {}  # case-name substring -> reason, for every extension
HESSIAN_GAPS: dict[str, str] = {}  # ... for DiagHessian/BatchDiagHessian only

"""Loss rules: exact and sampled square roots of the loss Hessian against torch.func.hessian."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backpack.derivatives.base import IO, Request
from backpack.registry import rule_for

N, C = 4, 5


def _ce_index_target(shape, ignore=False):
    y = torch.randint(0, shape[1], (shape[0], *shape[2:]))
    if ignore:
        y.view(-1)[::3] = 7  # ignore_index=7 below
    return y


def _soft_target(shape):
    return torch.rand(*shape, dtype=torch.float64).softmax(1) * 1.3  # mass != 1 on purpose


def _binary(shape):
    return torch.randint(0, 2, shape).double()


_W = torch.rand(C, dtype=torch.float64) + 0.5
# (id, module factory(reduction), output shape, target factory(output shape))
CASES = [
    (
        "mse-2d",
        lambda r: nn.MSELoss(reduction=r),
        (N, C),
        lambda s: torch.randn(s, dtype=torch.float64),
    ),
    (
        "mse-3d",
        lambda r: nn.MSELoss(reduction=r),
        (N, 3, 2),
        lambda s: torch.randn(s, dtype=torch.float64),
    ),
    ("ce-2d", lambda r: nn.CrossEntropyLoss(reduction=r), (N, C), _ce_index_target),
    ("ce-4d", lambda r: nn.CrossEntropyLoss(reduction=r), (N, C, 3, 2), _ce_index_target),
    (
        "ce-weight",
        lambda r: nn.CrossEntropyLoss(weight=_W, reduction=r),
        (N, C, 3, 2),
        _ce_index_target,
    ),
    (
        "ce-ignore",
        lambda r: nn.CrossEntropyLoss(ignore_index=7, reduction=r),
        (N, C),
        lambda s: _ce_index_target(s, ignore=True),
    ),
    (
        "ce-smooth",
        lambda r: nn.CrossEntropyLoss(label_smoothing=0.2, reduction=r),
        (N, C),
        _ce_index_target,
    ),
    (
        "ce-weight-smooth-ignore",
        lambda r: nn.CrossEntropyLoss(weight=_W, label_smoothing=0.2, ignore_index=7, reduction=r),
        (N, C, 3, 2),
        lambda s: _ce_index_target(s, ignore=True),
    ),
    ("ce-soft", lambda r: nn.CrossEntropyLoss(reduction=r), (N, C, 3), _soft_target),
    (
        "ce-soft-weight-smooth",
        lambda r: nn.CrossEntropyLoss(weight=_W, label_smoothing=0.1, reduction=r),
        (N, C),
        _soft_target,
    ),
    ("bce-1", lambda r: nn.BCEWithLogitsLoss(reduction=r), (N, 1), _binary),
    ("bce-2d", lambda r: nn.BCEWithLogitsLoss(reduction=r), (N, C), _binary),
    (
        "bce-3d-weights",
        lambda r: nn.BCEWithLogitsLoss(
            weight=torch.rand(3, 2, dtype=torch.float64) + 0.5,
            pos_weight=torch.rand(2, dtype=torch.float64) * 3,
            reduction=r,
        ),
        (N, 3, 2),
        _binary,
    ),
    (
        "bce-soft-posweight",
        lambda r: nn.BCEWithLogitsLoss(
            pos_weight=torch.tensor([2.0] * C, dtype=torch.float64), reduction=r
        ),
        (N, C),
        lambda s: torch.rand(s, dtype=torch.float64),
    ),
    ("nll", lambda r: nn.NLLLoss(reduction=r), (N, C), _ce_index_target),
]


@pytest.fixture(params=CASES, ids=[c[0] for c in CASES])
def problem(request):
    return request.param


def _setup(case, reduction):
    """``(module, rule, io, exact Hessian blocks [n, D, D])`` for one case and reduction."""
    torch.manual_seed(0)
    _, make, shape, target = case
    module = make(reduction)
    out = torch.randn(shape, dtype=torch.float64)
    if isinstance(module, nn.NLLLoss):
        out = out.log_softmax(1)
    y = target(shape)
    io = IO((out, y), None)
    # NLLLoss on log-probabilities: the root is the LogSoftmax+NLLLoss pair's (cross-entropy's)
    pair = nn.CrossEntropyLoss(reduction=reduction) if isinstance(module, nn.NLLLoss) else module
    hess = torch.func.hessian(lambda o: pair(o, y))(out)
    D = out[0].numel()
    hess = hess.reshape(N, D, N, D)
    off = hess.clone()
    off[torch.arange(N), :, torch.arange(N)] = 0
    assert off.abs().max() == 0  # block-diagonal over samples
    return module, rule_for(module), io, hess.diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def _blocks(S):
    """``[c, n, *out] -> [n, D, D]``: ``sum_c S_c S_c^T`` per sample."""
    flat = S.reshape(S.shape[0], S.shape[1], -1)
    return torch.einsum("cni,cnj->nij", flat, flat)


REDUCTIONS = ["mean", "sum"]


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_sqrt_hessian_exact(problem, reduction):
    module, rule, io, hess = _setup(problem, reduction)
    S = rule.sqrt_hessian(module, io)
    assert S.shape[1:] == io.inputs[0].shape
    assert S.dtype == torch.float64
    torch.testing.assert_close(_blocks(S), hess, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_sqrt_hessian_lean(problem, reduction):
    """The lean root has the same outer product; cross-entropy (and NLL) need one column
    fewer per position (their Hessian's rank), the others as many as the exact root."""
    module, rule, io, hess = _setup(problem, reduction)
    S, lean = rule.sqrt_hessian(module, io), rule.sqrt_hessian_lean(module, io)
    assert lean.shape[1:] == S.shape[1:]
    classes = io.inputs[0].shape[1]
    fewer = isinstance(module, (nn.CrossEntropyLoss, nn.NLLLoss))
    assert lean.shape[0] == (S.shape[0] // classes * (classes - 1) if fewer else S.shape[0])
    torch.testing.assert_close(_blocks(lean), hess, atol=1e-12, rtol=1e-10)


def test_cross_entropy_lean_root_when_one_class_dominates():
    """``p_r`` is the least likely class, so the reflection stays well-conditioned as any
    class's probability tends to 1 (and with probabilities that underflow to 0)."""
    module = nn.CrossEntropyLoss()
    out = torch.tensor([[40.0, 0.0, -800.0], [0.0, 1e-9, 0.0]], dtype=torch.float64)
    io = IO((out, torch.tensor([0, 2])), None)
    rule = rule_for(module)
    lean = rule.sqrt_hessian_lean(module, io)
    assert lean.shape == (2, 2, 3) and lean.isfinite().all()
    torch.testing.assert_close(_blocks(lean), _blocks(rule.sqrt_hessian(module, io)))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_sqrt_hessian_sampled(problem, reduction):
    module, rule, io, hess = _setup(problem, reduction)
    m = 50_000
    torch.manual_seed(1)
    S = rule.sqrt_hessian_sampled(module, io, m)
    assert S.shape == (m, *io.inputs[0].shape)
    torch.manual_seed(1)
    torch.testing.assert_close(rule.sqrt_hessian_sampled(module, io, m), S, atol=0, rtol=0)
    scale = hess.abs().max().clamp(min=1e-12)
    torch.testing.assert_close(_blocks(S), hess, atol=3e-2 * scale, rtol=0)


def _softmax_columns(p):
    """``diag(sqrt p) - p sqrt(p)^T`` per row of ``p [r, C]``: ``[r, a, k]``, column ``k``."""
    root = p.sqrt()
    return torch.diag_embed(root) - p.unsqueeze(-1) * root.unsqueeze(-2)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_column_convention(reduction):
    torch.manual_seed(0)
    module = nn.CrossEntropyLoss(reduction=reduction)
    out = torch.randn(N, C, 3, 2, dtype=torch.float64)
    io = IO((out, _ce_index_target(out.shape)), None)
    S = rule_for(module).sqrt_hessian(module, io)
    D = 6
    assert S.shape == (C * D, N, C, 3, 2)
    factor = (1.0 / (N * D)) ** 0.5 if reduction == "mean" else 1.0
    p = out.softmax(1).reshape(N, C, D)
    S = S.reshape(C, D, N, C, D)  # column k * D + j: class k at position j
    for j in range(D):  # test-side loop only, over a handful of positions
        expected = _softmax_columns(p[:, :, j]) * factor  # [n, a, k]
        torch.testing.assert_close(S[:, j, :, :, j], expected.permute(2, 0, 1))
        others = [i for i in range(D) if i != j]
        assert S[:, j, :, :, others].abs().max() == 0


def test_cross_entropy_2d_columns_weighted():
    torch.manual_seed(0)
    module = nn.CrossEntropyLoss(weight=_W)
    out = torch.randn(N, C, dtype=torch.float64)
    y = _ce_index_target(out.shape)
    S = rule_for(module).sqrt_hessian(module, IO((out, y), None))
    factor = (_W[y] / _W[y].sum()).sqrt()  # [n]
    expected = _softmax_columns(out.softmax(1)) * factor[:, None, None]
    torch.testing.assert_close(S, expected.permute(2, 0, 1))


def _Ext(second_order):
    return Request("_Ext", second_order=second_order)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_check_reduction_none(case):
    module = case[1]("none")
    out = torch.randn(case[2], dtype=torch.float64).log_softmax(1)
    io = IO((out, case[3](case[2])), None)
    rule = rule_for(module)
    name = type(module).__name__
    with pytest.raises(ValueError, match=rf"{name}.*'mean' or 'sum'"):
        rule.check(module, io, _Ext(True))
    rule.check(module, io, _Ext(False))  # first-order extensions work with reduction='none'
    rule.check(
        nn.CrossEntropyLoss() if name == "CrossEntropyLoss" else case[1]("sum"), io, _Ext(True)
    )


def test_kwargs_call():
    module = nn.MSELoss()
    out = torch.randn(N, 3, dtype=torch.float64)
    S = rule_for(module).sqrt_hessian(module, IO((), None, {"input": out, "target": out}))
    assert S.shape == (3, N, 3)

"""SqrtGGNExact / SqrtGGNMC: ``V V^T`` equals the GGN block; shapes, columns, MC convergence."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backpack import backpack, extend
from backpack.extensions import BatchDiagGGNMC, DiagGGNExact, DiagGGNMC, SqrtGGNExact, SqrtGGNMC
from tests.cases import CHAIN_CASES, GGN_GAPS, LAYER_CASES, one_loss_each, problems
from tests.oracles import ggn_block

PROBLEMS = [
    p
    for p in problems(LAYER_CASES + CHAIN_CASES)
    if (p.reduction, p.n) in {("mean", 3), ("sum", 1)} and one_loss_each(p)
]


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.id)
def test_sqrt_ggn_exact_factors_the_ggn_block(problem):
    problem.skip_gaps(GGN_GAPS)
    model, lossfunc, x, y = problem.run([SqrtGGNExact(), DiagGGNExact()])
    for name, p in model.named_parameters():
        v = p.sqrt_ggn_exact
        assert v.shape[1:] == (problem.n, *p.shape)
        flat = v.reshape(-1, p.numel())
        torch.testing.assert_close(flat.T @ flat, ggn_block(model, lossfunc, x, y, name))
        torch.testing.assert_close(v.square().sum((0, 1)), p.diag_ggn_exact)


def test_cross_entropy_columns_and_subsampling():
    torch.manual_seed(0)
    lin = extend(nn.Linear(4, 3).double())
    lossfunc = extend(nn.CrossEntropyLoss())
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    idx = [3, 0, 0]
    # DiagGGNExact alone would flow C - 1 columns; sharing its stream, SqrtGGNExact gets all C
    exts = DiagGGNExact(), SqrtGGNExact(subsampling=idx), SqrtGGNMC(mc_samples=2, subsampling=idx)
    with backpack(*exts):
        lossfunc(lin(x), y).backward()
    p = lin(x).softmax(1).detach()[idx]
    root = p.sqrt()
    cols = (torch.diag_embed(root) - p.unsqueeze(-1) * root.unsqueeze(-2)) / 5**0.5  # [n, a, k]
    torch.testing.assert_close(lin.bias.sqrt_ggn_exact, cols.permute(2, 0, 1))
    assert lin.weight.sqrt_ggn_mc.shape == (2, 3, 3, 4)


def test_sqrt_ggn_mc_converges():
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double())
    lossfunc = extend(nn.CrossEntropyLoss())
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 3, (3,))
    with backpack(SqrtGGNMC(mc_samples=20000)):
        lossfunc(model(x), y).backward()
    for name, p in model.named_parameters():
        flat = p.sqrt_ggn_mc.reshape(-1, p.numel())
        exact = ggn_block(model, lossfunc, x, y, name)
        torch.testing.assert_close(flat.T @ flat, exact, atol=0.05 * exact.abs().max(), rtol=0)


def test_mc_repeated_subsampling_draws_independently():
    """``subsampling=[0, 0, 2]``: each entry its own MC draw (1.7): the two rows of sample 0
    differ, each converges to sample 0's GGN block, and their cross product to zero."""
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double())
    lossfunc = extend(nn.CrossEntropyLoss(reduction="sum"))
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 3, (3,))
    idx, m = [0, 0, 2], 20000
    exts = SqrtGGNMC(mc_samples=m, subsampling=idx), DiagGGNMC(mc_samples=m, subsampling=idx)
    with backpack(BatchDiagGGNMC(subsampling=idx), *exts):
        lossfunc(model(x), y).backward()
    for name, p in model.named_parameters():
        v = p.sqrt_ggn_mc
        assert v.shape == (m, 3, *p.shape) and p.diag_ggn_mc_batch.shape == (3, *p.shape)
        assert not torch.allclose(p.diag_ggn_mc_batch[0], p.diag_ggn_mc_batch[1])
        rows = v.flatten(2).unbind(1)  # [m, numel] per entry
        blocks = [ggn_block(model, lossfunc, x[i : i + 1], y[i : i + 1], name) for i in idx]
        tol = dict(atol=0.05 * blocks[0].abs().max(), rtol=0)
        for row, block in zip(rows, blocks):
            torch.testing.assert_close(row.T @ row, block, **tol)
        torch.testing.assert_close(rows[0].T @ rows[1], torch.zeros_like(blocks[0]), **tol)
        diag = sum(b.diagonal() for b in blocks).view_as(p)
        torch.testing.assert_close(p.diag_ggn_mc, diag, atol=0.05 * diag.abs().max(), rtol=0)

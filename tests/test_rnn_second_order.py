"""Second-order extensions through ``nn.RNN``/``nn.LSTM``/``nn.GRU`` (sequence output) against
oracles.

The diagonals and square roots of every recurrent case, against the oracles, are in
test_secondorder.py and test_sqrt_ggn.py (the shared problem list); here: what is particular
to recurrences."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backpack import backpack, extend
from backpack.custom_module.reduce_tuple import ReduceTuple
from backpack.derivatives.base import IO
from backpack.extensions import (
    BatchDiagGGNExact,
    BatchDiagGGNMC,
    DiagGGNExact,
    DiagGGNMC,
    DiagHessian,
    SqrtGGNMC,
)
from backpack.registry import rule_for
from tests.cases import LAYER_CASES, problems
from tests.oracles import ggn_diag, hessian_diag

RNN_CASES = [c for c in LAYER_CASES if c.name.endswith("-bf-seq")]
PROBLEMS = [p for p in problems(RNN_CASES) if (p.reduction, p.n) in {("mean", 3), ("sum", 1)}]


MC_PROBLEMS = [p for p in PROBLEMS if p.loss == "ce" and p.n == 3]


@pytest.mark.parametrize("problem", MC_PROBLEMS, ids=lambda p: p.id)
def test_ggn_mc_extensions_share_one_sample(problem):
    model, *_ = problem.run([DiagGGNMC(mc_samples=4), BatchDiagGGNMC(mc_samples=4), SqrtGGNMC(4)])
    for _, p in model.named_parameters():
        assert p.sqrt_ggn_mc.shape == (4, problem.n, *p.shape)
        torch.testing.assert_close(p.diag_ggn_mc_batch.sum(0), p.diag_ggn_mc)
        torch.testing.assert_close(p.sqrt_ggn_mc.square().sum((0, 1)), p.diag_ggn_mc)


def test_ggn_mc_converges_to_exact():
    problem = next(p for p in MC_PROBLEMS if p.case.name == "LSTM-2layer-bidir-bf-seq")
    model, *_ = problem.run([DiagGGNMC(mc_samples=20000), DiagGGNExact()])
    for _, p in model.named_parameters():
        scale = p.diag_ggn_exact.abs().max()
        torch.testing.assert_close(p.diag_ggn_mc, p.diag_ggn_exact, atol=0.05 * scale, rtol=0.1)


def test_subsampling():
    problem = next(p for p in PROBLEMS if p.id == "GRU-2layer-bidir-bf-seq-ce-mean-N3")
    idx = [2, 0, 0]
    model, lossfunc, x, y = problem.run([BatchDiagGGNExact(subsampling=idx)])
    ggn_n = ggn_diag(model, lossfunc, x, y, per_sample=True)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.diag_ggn_exact_batch, ggn_n[name][idx])


@pytest.mark.parametrize("cls", [nn.RNN, nn.LSTM, nn.GRU])
def test_time_major_layout(cls):
    """``batch_first=False``: ``mat`` ``[v, t, n, h]`` in, ``[v, t, n, f]`` out, same numbers."""
    torch.manual_seed(0)
    bf = cls(4, 3, num_layers=2, bidirectional=True, batch_first=True).double()
    tf = cls(4, 3, num_layers=2, bidirectional=True).double()
    tf.load_state_dict(bf.state_dict())
    x, mat = torch.randn(2, 5, 4, dtype=torch.float64), torch.randn(7, 2, 5, 6, dtype=torch.float64)
    rule = rule_for(bf)
    io_bf, io_tf, mat_tf = IO((x,), None), IO((x.transpose(0, 1),), None), mat.transpose(1, 2)
    jac_bf, jac_tf = rule.jac_t_mat_prod(bf, io_bf, mat), rule.jac_t_mat_prod(tf, io_tf, mat_tf)
    torch.testing.assert_close(jac_tf, jac_bf.transpose(1, 2))
    for name, _ in bf.named_parameters():
        for sum_batch in (True, False):
            torch.testing.assert_close(
                rule.param_jac_t_mat_prod(tf, io_tf, mat_tf, name, sum_batch),
                rule.param_jac_t_mat_prod(bf, io_bf, mat, name, sum_batch),
            )
    # against autograd: J^T mat for one column
    xl = x.clone().requires_grad_()
    (ref,) = torch.autograd.grad(bf(xl)[0], xl, mat[3])
    torch.testing.assert_close(jac_bf[3], ref)


def test_diag_hessian_through_inner_lstm():
    """A layer before the LSTM receives the recurrence's input residual."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 4),
        nn.LSTM(4, 3, batch_first=True),
        ReduceTuple(0),
        nn.Flatten(),
        nn.Linear(15, 3),
    ).double()
    model, lossfunc = extend(model), extend(nn.CrossEntropyLoss())
    x, y = torch.randn(2, 5, 4, dtype=torch.float64), torch.tensor([0, 2])
    with backpack(DiagHessian()):
        lossfunc(model(x), y).backward()
    hess = hessian_diag(model, lossfunc, x, y)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.diag_h, hess[name])


def test_hessian_not_reaching_the_rnn_is_fine():
    """Only the layers after the RNN are extended: the Hessian stream never reaches it."""
    torch.manual_seed(0)
    rnn, head = nn.LSTM(4, 3, batch_first=True).double(), extend(nn.Linear(15, 3).double())
    lossfunc = extend(nn.CrossEntropyLoss())
    x, y = torch.randn(2, 5, 4, dtype=torch.float64), torch.tensor([0, 2])
    with backpack(DiagHessian()):
        lossfunc(head(rnn(x)[0].detach().flatten(1)), y).backward()
    assert head.weight.diag_h.shape == head.weight.shape

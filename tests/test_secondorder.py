"""Second-order diagonals against float64 oracles (explicit Jacobians, double backward)."""

from __future__ import annotations

import pytest
import torch

from backpack import backpack, extend
from backpack.extensions import (
    BatchDiagGGNExact,
    BatchDiagGGNMC,
    BatchDiagHessian,
    DiagGGNExact,
    DiagGGNMC,
    DiagHessian,
)
from tests.cases import (
    CHAIN_CASES,
    DEVICES,
    LAYER_CASES,
    SECOND_ORDER_GAPS,
    one_loss_each,
    params,
    problems,
)
from tests.oracles import ggn_diag, hessian_diag

# every case and loss; reduction and batch size in two combinations (mean N=3, sum N=1); by
# default two losses per case (the rest: --runslow)
PROBLEMS = [
    p
    for p in problems(LAYER_CASES + CHAIN_CASES)
    if (p.reduction, p.n) in {("mean", 3), ("sum", 1)}
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("problem", params(PROBLEMS, one_loss_each))
def test_diagonals_match_oracles(problem, device):
    problem.skip_gaps(SECOND_ORDER_GAPS)
    exts = [DiagGGNExact(), BatchDiagGGNExact(), DiagHessian(), BatchDiagHessian()]
    model, lossfunc, x, y = problem.run(exts, device)
    # totals are sums of the per-sample oracles: samples do not interact in these models
    ggn_n = ggn_diag(model, lossfunc, x, y, per_sample=True)
    hess_n = hessian_diag(model, lossfunc, x, y, per_sample=True)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.diag_ggn_exact, ggn_n[name].sum(0))
        torch.testing.assert_close(p.diag_ggn_exact_batch, ggn_n[name])
        torch.testing.assert_close(p.diag_h, hess_n[name].sum(0))
        torch.testing.assert_close(p.diag_h_batch, hess_n[name])


def test_totals_oracle_on_whole_batch():
    """The whole-batch oracles (no per-sample split) agree too, on a curved chain."""
    problem = next(p for p in PROBLEMS if p.id == "Linear-Sigmoid-Linear-ce-mean-N3")
    model, lossfunc, x, y = problem.run([DiagGGNExact(), DiagHessian()])
    ggn, hess = ggn_diag(model, lossfunc, x, y), hessian_diag(model, lossfunc, x, y)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.diag_ggn_exact, ggn[name])
        torch.testing.assert_close(p.diag_h, hess[name])


MC_PROBLEMS = [
    p for p in problems(CHAIN_CASES[:4] + LAYER_CASES[3:4]) if p.n == 3 and p.reduction == "mean"
]


@pytest.mark.parametrize("problem", MC_PROBLEMS, ids=lambda p: p.id)
def test_mc_converges_to_exact_and_is_reproducible(problem):
    problem.skip_gaps(SECOND_ORDER_GAPS)
    model, *_ = problem.run(
        [DiagGGNMC(mc_samples=20000), BatchDiagGGNMC(mc_samples=20000), DiagGGNExact()]
    )
    first = {n: p.diag_ggn_mc.clone() for n, p in model.named_parameters()}
    for name, p in model.named_parameters():
        assert p.diag_ggn_mc_batch.shape == (problem.n, *p.shape)
        torch.testing.assert_close(p.diag_ggn_mc_batch.sum(0), p.diag_ggn_mc)  # one shared sample
        scale = p.diag_ggn_exact.abs().max()
        torch.testing.assert_close(p.diag_ggn_mc, p.diag_ggn_exact, atol=0.05 * scale, rtol=0.1)
    model, *_ = problem.run([DiagGGNMC(mc_samples=20000)])
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.diag_ggn_mc, first[name])  # torch.manual_seed reproduces


SUB = [p for p in problems(CHAIN_CASES[:3]) if p.n == 3 and p.loss == "ce"]


@pytest.mark.parametrize("problem", SUB, ids=lambda p: p.id)
def test_subsampling_second_order(problem):
    idx = [2, 0, 0]
    exts = [
        BatchDiagGGNExact(subsampling=idx),
        DiagGGNExact(subsampling=idx),
        BatchDiagHessian(subsampling=idx),
    ]
    model, lossfunc, x, y = problem.run(exts)
    ggn_n = ggn_diag(model, lossfunc, x, y, per_sample=True)
    hess_n = hessian_diag(model, lossfunc, x, y, per_sample=True)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.diag_ggn_exact_batch, ggn_n[name][idx])
        torch.testing.assert_close(p.diag_ggn_exact, ggn_n[name][idx].sum(0))
        torch.testing.assert_close(p.diag_h_batch, hess_n[name][idx])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("options", [{}, {"weight": [0.5, 2.0, 1.0], "ignore_index": 1}])
def test_log_softmax_nll_equals_cross_entropy(reduction, options):
    """LogSoftmax -> NLLLoss: the pair's GGN (= cross-entropy's) and the exact Hessian."""
    torch.manual_seed(0)
    kw = {
        k: torch.tensor(v, dtype=torch.float64) if k == "weight" else v for k, v in options.items()
    }
    logits = torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    ).double()
    model = torch.nn.Sequential(logits, torch.nn.LogSoftmax(dim=1))
    nll = torch.nn.NLLLoss(reduction=reduction, **kw)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 2, 0])
    extend(model)
    with backpack(DiagGGNExact(), DiagHessian(), BatchDiagGGNExact()):
        extend(nll)(model(x), y).backward()
    ce = torch.nn.CrossEntropyLoss(reduction=reduction, **kw)
    ggn = ggn_diag(logits, ce, x, y)
    hess = hessian_diag(model, nll, x, y)
    for name, p in logits.named_parameters():
        torch.testing.assert_close(p.diag_ggn_exact, ggn[name])
        torch.testing.assert_close(p.diag_h, hess["0." + name])
        torch.testing.assert_close(p.diag_ggn_exact_batch.sum(0), ggn[name])


PWL_CASES = {
    f"Linear-{a}-Linear" for a in ("ReLU", "ReLUinplace", "LeakyReLU", "Identity", "Dropout")
} | {f"Conv{d}d-MaxPool{d}d-Conv{d}d" for d in (1, 2, 3)}
PWL = [p for p in PROBLEMS if p.case.name in PWL_CASES and p.loss != "bce"]


@pytest.mark.parametrize("problem", PWL, ids=lambda p: p.id)
def test_ggn_equals_hessian_on_piecewise_linear_nets_with_mse_ce(problem):
    """With MSE/CE and piecewise-linear layers, the Hessian diagonal is the GGN diagonal."""
    model, *_ = problem.run(
        [DiagGGNExact(), DiagHessian(), BatchDiagGGNExact(), BatchDiagHessian()]
    )
    for p in model.parameters():
        torch.testing.assert_close(p.diag_h, p.diag_ggn_exact)
        torch.testing.assert_close(p.diag_h_batch, p.diag_ggn_exact_batch)


def test_activations_overwrite_the_factor_a_rule_just_made(monkeypatch):
    """A ReLU overwrites the fresh factor the layer after it produced (no new memory for the
    largest columns); where one factor reaches two modules (a sum of branches) it is copied.
    Both give the diagonals of the plain products."""
    from backpack.custom_module.branching import SumModule
    from backpack.derivatives.elementwise import ReLURule

    class Branches(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.relu1, self.relu2 = (
                torch.nn.Linear(4, 5),
                torch.nn.ReLU(),
                torch.nn.ReLU(),
            )
            self.add, self.head = (
                SumModule(),
                torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(5, 3)),
            )

        def forward(self, x):
            h = self.lin(x)
            return self.head(self.add(self.relu1(h), self.relu2(h)))

    def diagonals():
        torch.manual_seed(0)
        model, lossfunc = extend(Branches().double()), extend(torch.nn.CrossEntropyLoss())
        x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
        with backpack(DiagGGNExact(), DiagHessian()):
            lossfunc(model(x), y).backward()
        return [(p.diag_ggn_exact, p.diag_h) for p in model.parameters()]

    calls = []
    inplace = ReLURule.jac_t_mat_prod_
    monkeypatch.setattr(ReLURule, "jac_t_mat_prod_", lambda *a: calls.append(1) or inplace(*a))
    overwritten = diagonals()
    assert len(calls) == 2  # the head's ReLU, for each stream; the branches' ReLUs share theirs
    monkeypatch.setattr(ReLURule, "jac_t_mat_prod_", None)
    for mine, plain in zip(overwritten, diagonals()):
        torch.testing.assert_close(mine, plain)

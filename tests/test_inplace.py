"""In-place layers (``inplace=True`` activations and dropout, in-place residual additions):
every extension against the oracles, in chains and residual blocks built from modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from backpack import backpack, extend, register
from backpack.custom_module.branching import SumModule
from backpack.extensions import (
    GGNMP,
    HMP,
    KFLR,
    BatchDiagGGNExact,
    BatchDiagHessian,
    BatchGrad,
    BatchL2Grad,
    DiagGGNExact,
    DiagHessian,
    SqrtGGNExact,
    SumGradSquared,
    Variance,
)
from backpack.registry import rule_for
from tests.oracles import ggn_block, ggn_diag, hessian_diag, per_sample_grads


class InplaceAdd(nn.Module):
    """``a += b`` (a residual addition written in place); ``inplace`` makes the engine read
    the input's autograd identity before the module overwrites it."""

    inplace = True

    def forward(self, a, b):
        a += b
        return a


register(InplaceAdd)(type(rule_for(SumModule())))  # same Jacobians as the out-of-place sum


class Block(nn.Module):
    """``relu(x + lin2(relu(lin1(x))))`` from modules, every ReLU in place."""

    def __init__(self, add: nn.Module):
        super().__init__()
        self.lin1, self.lin2, self.add = nn.Linear(4, 4), nn.Linear(4, 4), add
        self.relu1, self.relu2 = nn.ReLU(inplace=True), nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu2(self.add(self.lin2(self.relu1(self.lin1(x))), x))


def _chain(*acts: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), *acts, nn.Linear(5, 3))


MODELS = {
    "ReLU": lambda: _chain(nn.ReLU(inplace=True)),
    "LeakyReLU": lambda: _chain(nn.LeakyReLU(0.1, inplace=True)),
    "Hardtanh": lambda: _chain(nn.Hardtanh(-0.3, 0.3, inplace=True)),
    "ReLU6": lambda: _chain(nn.ReLU6(inplace=True)),
    "ELU": lambda: _chain(nn.ELU(0.7, inplace=True)),
    "SELU": lambda: _chain(nn.SELU(inplace=True)),
    "Hardsigmoid": lambda: _chain(nn.Hardsigmoid(inplace=True)),
    "Dropout-eval": lambda: _chain(nn.Dropout(0.5, inplace=True)).eval(),
    # in place on an in-place result that autograd saved fails in plain PyTorch too; eval-mode
    # dropout returns its input (the engine sees a pass-through)
    "ELU-Dropout-eval": lambda: _chain(nn.ELU(inplace=True), nn.Dropout(inplace=True)).eval(),
    "Block-SumModule": lambda: nn.Sequential(
        nn.Linear(4, 4), Block(SumModule()), Block(SumModule()), nn.Linear(4, 3)
    ),
    "Block-InplaceAdd": lambda: nn.Sequential(
        nn.Linear(4, 4), Block(InplaceAdd()), Block(InplaceAdd()), nn.Linear(4, 3)
    ),
}
FIRST = {
    BatchGrad: lambda gb: gb,
    BatchL2Grad: lambda gb: gb.flatten(1).square().sum(1),
    SumGradSquared: lambda gb: gb.square().sum(0),
    Variance: lambda gb: gb.var(0, unbiased=False),
}
SECOND = [DiagGGNExact, BatchDiagGGNExact, DiagHessian, BatchDiagHessian, SqrtGGNExact, GGNMP, HMP]


def _problem(name: str):
    torch.manual_seed(0)
    model = MODELS[name]().double()
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 2, 1])
    return model, extend(nn.CrossEntropyLoss()), x, y


def _hessian(model, lossfunc, x, y, name):
    params = {k: p.detach() for k, p in model.named_parameters()}

    def loss(q):
        return lossfunc(functional_call(model, {**params, name: q}, (x,)), y)

    p = params[name]
    return torch.func.hessian(loss)(p).reshape(p.numel(), p.numel())


# piecewise linear, and torch.func has no forward AD for it: its Hessian is the GGN
HESSIAN_IS_GGN = {"Hardsigmoid"}


@pytest.mark.parametrize("name", MODELS)
def test_every_extension_matches_the_oracles(name):
    model, lossfunc, x, y = _problem(name)
    grads = per_sample_grads(model, lossfunc, x, y)
    ggn_n = ggn_diag(model, lossfunc, x, y, per_sample=True)
    if name in HESSIAN_IS_GGN:
        hess_n, hessian_block = ggn_n, ggn_block
    else:
        hess_n, hessian_block = hessian_diag(model, lossfunc, x, y, per_sample=True), _hessian
    extend(model)
    with backpack(*(ext() for ext in [*FIRST, *SECOND]), KFLR()):
        lossfunc(model(x), y).backward()
    for pname, p in model.named_parameters():
        torch.testing.assert_close(p.grad_batch.sum(0), p.grad)
        for ext, reduce in FIRST.items():
            torch.testing.assert_close(getattr(p, ext().savefield), reduce(grads[pname]))
        torch.testing.assert_close(p.diag_ggn_exact_batch, ggn_n[pname])
        torch.testing.assert_close(p.diag_ggn_exact, ggn_n[pname].sum(0))
        torch.testing.assert_close(p.diag_h_batch, hess_n[pname])
        torch.testing.assert_close(p.diag_h, hess_n[pname].sum(0))
        block = ggn_block(model, lossfunc, x, y, pname)
        v = p.sqrt_ggn_exact.flatten(2)
        torch.testing.assert_close(torch.einsum("cnp,cnq->pq", v, v), block)
        mat = torch.randn(2, *p.shape, dtype=torch.float64)
        torch.testing.assert_close(p.ggnmp(mat).flatten(1), mat.flatten(1) @ block)
        hess = hessian_block(model, lossfunc, x, y, pname)
        torch.testing.assert_close(p.hmp(mat).flatten(1), mat.flatten(1) @ hess)
        assert [f.shape[0] for f in p.kflr] == list(p.shape)


def test_train_mode_dropout_in_place_equals_out_of_place():
    """Same seed, same mask: in-place dropout gives what the out-of-place layer gives."""
    results = []
    for inplace in (False, True):
        torch.manual_seed(0)
        model = extend(_chain(nn.Dropout(0.4, inplace=inplace), nn.Tanh()).double())
        lossfunc = extend(nn.CrossEntropyLoss())
        x, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0, 2])
        exts = [ext() for ext in [*FIRST, *SECOND[:5]]]
        with backpack(*exts):
            lossfunc(model(x), y).backward()
        fields = [e.savefield for e in exts]
        results.append({(n, f): getattr(p, f) for n, p in model.named_parameters() for f in fields})
    assert (results[1][("0.weight", "grad_batch")] != 0).any()
    for key, value in results[0].items():
        torch.testing.assert_close(results[1][key], value, msg=str(key))


def test_inplace_layer_whose_derivative_is_lost_raises():
    """First order needs no Jacobian of the layer; what flows through it does."""
    model = extend(_chain(nn.SiLU(inplace=True)).double())
    lossfunc = extend(nn.CrossEntropyLoss())
    with pytest.raises(NotImplementedError, match="inplace=True overwrites the input"):
        with backpack(DiagGGNExact()):
            lossfunc(model(torch.randn(2, 4).double()), torch.tensor([0, 1])).backward()

"""In-place layers (``inplace=True`` activations and dropout, in-place residual additions):
every extension against the oracles, in chains and residual blocks built from modules."""

from __future__ import annotations

import inspect
import warnings
import weakref

import pytest
import torch
from torch import nn
from torch.func import functional_call

from backpack import backpack, disable, extend, register
from backpack.custom_module.branching import SumModule
from backpack.engine import hooks
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
from tests.oracles import flat_factors, ggn_block, ggn_diag, hessian_diag, per_sample_grads


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
    # derivatives that need the input itself: the engine keeps a copy (Rule.inplace_needs_input)
    "Hardswish": lambda: _chain(nn.Hardswish(inplace=True)),
    "SiLU": lambda: _chain(nn.SiLU(inplace=True)),
    "Mish": lambda: _chain(nn.Mish(inplace=True)),
    "CELU": lambda: _chain(nn.CELU(0.7, inplace=True)),
    "Threshold": lambda: _chain(nn.Threshold(0.1, -2.0, inplace=True)),
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


# every module of torch.nn with an ``inplace`` argument (test_the_table_covers_torch_nn), with
# arguments whose branches the inputs below reach; dropout in eval mode (training: above)
ACTIVATIONS = {
    "CELU": lambda ip: nn.CELU(0.7, inplace=ip),
    "ELU": lambda ip: nn.ELU(1.3, inplace=ip),
    "Hardsigmoid": lambda ip: nn.Hardsigmoid(inplace=ip),
    "Hardswish": lambda ip: nn.Hardswish(inplace=ip),
    "Hardtanh": lambda ip: nn.Hardtanh(-0.5, 0.8, inplace=ip),
    "LeakyReLU": lambda ip: nn.LeakyReLU(0.1, inplace=ip),
    "Mish": lambda ip: nn.Mish(inplace=ip),
    "RReLU": lambda ip: nn.RReLU(0.1, 0.3, inplace=ip).eval(),
    "ReLU": lambda ip: nn.ReLU(inplace=ip),
    "ReLU6": lambda ip: nn.ReLU6(inplace=ip),
    "SELU": lambda ip: nn.SELU(inplace=ip),
    "SiLU": lambda ip: nn.SiLU(inplace=ip),
    "Threshold": lambda ip: nn.Threshold(0.1, -2.0, inplace=ip),
    **{
        name: lambda ip, name=name: getattr(nn, name)(0.3, inplace=ip).eval()
        for name in ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout",
                     "FeatureAlphaDropout")
    },
}  # fmt: skip
ARCHS = {  # the activation between parametrised layers: after a Linear, after a Conv2d
    "mlp": (lambda act: nn.Sequential(nn.Linear(4, 6), act, nn.Linear(6, 3)), (4,)),
    "cnn": (
        lambda act: nn.Sequential(nn.Conv2d(2, 3, 2), act, nn.Flatten(), nn.Linear(12, 3)),
        (2, 3, 3),
    ),
}
COMPARED = [BatchGrad, BatchL2Grad, SumGradSquared, Variance, DiagGGNExact, BatchDiagGGNExact,
            DiagHessian, BatchDiagHessian, KFLR]  # fmt: skip


def test_the_table_covers_torch_nn():
    """A module type torch adds with an ``inplace`` argument fails here until it is listed."""
    found = {
        name
        for name in dir(nn)
        if isinstance(cls := getattr(nn, name), type)
        and issubclass(cls, nn.Module)
        and "inplace" in inspect.signature(cls.__init__).parameters
    }
    assert found == set(ACTIVATIONS)


def _savefields(arch: str, act: str, inplace: bool, x: torch.Tensor, y: torch.Tensor) -> dict:
    torch.manual_seed(0)
    make, _ = ARCHS[arch]
    model = extend(make(ACTIVATIONS[act](inplace)).double())
    lossfunc = extend(nn.CrossEntropyLoss())
    exts = [ext() for ext in COMPARED]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*automatic rule")  # every layer has a rule
        with backpack(*exts):
            lossfunc(model(x), y).backward()
    fields = [e.savefield for e in exts]
    result = {(n, f): getattr(p, f) for n, p in model.named_parameters() for f in fields}
    for record_set in (m.__dict__.get("_backpack_calls", ()) for m in model.modules()):
        assert not record_set  # every record released after backward
    return result


@pytest.mark.parametrize(
    "act, arch",
    [(a, b) for a in ACTIVATIONS for b in ARCHS if (a, b) != ("Dropout1d", "cnn")],  # 4-D input
)
def test_inplace_equals_out_of_place(act, arch):
    """Every in-place-capable layer of torch.nn in place gives what it gives out of place
    (checked against the oracles for the rules: test_param_free_rules, cases_activations)."""
    torch.manual_seed(1)
    x = 2 * torch.randn(5, *ARCHS[arch][1], dtype=torch.float64)  # both sides of the kinks
    y = torch.tensor([0, 2, 1, 1, 0])
    want = _savefields(arch, act, False, x, y)
    got = _savefields(arch, act, True, x, y)
    assert (want[("0.weight", "diag_h")] != 0).any()
    for key, value in want.items():
        if isinstance(value, list):
            for a, b in zip(flat_factors(got[key]), flat_factors(value), strict=True):
                torch.testing.assert_close(a, b, msg=str(key))
        else:
            torch.testing.assert_close(got[key], value, msg=str(key))


def _record(module: nn.Module):
    (record,) = module.__dict__["_backpack_calls"]
    return record


@pytest.mark.parametrize("act", ["Hardswish", "ReLU"])
def test_input_is_copied_only_where_the_rule_needs_it(act):
    """Hardswish keeps a copy of its input until backward, then frees it; ReLU copies nothing
    (its derivative follows from the output)."""
    model = extend(_chain(ACTIVATIONS[act](True)).double())
    lossfunc = extend(nn.CrossEntropyLoss())
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 2, 1])
    hidden = model[0](x)
    out = model[1](hidden)
    assert out is hidden
    kept = _record(model[1]).io.inputs[0]
    copied = kept.data_ptr() != out.data_ptr()
    assert copied == (act == "Hardswish") == rule_for(model[1]).inplace_needs_input
    if copied:
        torch.testing.assert_close(kept, model[0](x).detach())
    ref = weakref.ref(kept)
    del kept
    with backpack(DiagHessian()):
        lossfunc(model[2](out), y).backward()
    assert not model[1].__dict__["_backpack_calls"]
    assert ref() is None or not copied  # the copy died with the record
    assert not hooks._PENDING


def test_no_copy_without_recording():
    """Forward passes that record nothing (no grad, ``disable()``, inside torch.func) leave
    nothing behind."""
    model = extend(_chain(nn.SiLU(inplace=True)).double())
    x = torch.randn(3, 4, dtype=torch.float64)
    with torch.no_grad():
        model(x)
    with disable():
        model(x)
    params = {k: p.detach() for k, p in model.named_parameters()}
    torch.func.vmap(lambda xn: functional_call(model, params, (xn,)))(x)
    assert not hooks._PENDING
    assert not model[1].__dict__.get("_backpack_calls")


def test_inplace_switched_on_after_extend():
    """``inplace`` read at each call, not at ``extend``."""
    torch.manual_seed(1)
    x, y = 2 * torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0])
    want = _savefields("mlp", "Hardswish", False, x, y)
    torch.manual_seed(0)
    model = extend(ARCHS["mlp"][0](nn.Hardswish()).double())
    model[1].inplace = True
    with backpack(DiagHessian()):
        extend(nn.CrossEntropyLoss())(model(x), y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.diag_h, want[(name, "diag_h")])


def test_rrelu_training_in_place_equals_out_of_place():
    """Same seed, same random slopes: the rule reads each slope as ``y / x``."""
    results = []
    for inplace in (False, True):
        torch.manual_seed(0)
        model = extend(_chain(nn.RReLU(0.1, 0.4, inplace=inplace)).double())
        lossfunc = extend(nn.CrossEntropyLoss())
        x, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0, 2])
        exts = [ext() for ext in [*FIRST, *SECOND[:5]]]
        with backpack(*exts):
            lossfunc(model(x), y).backward()
        fields = [e.savefield for e in exts]
        results.append({(n, f): getattr(p, f) for n, p in model.named_parameters() for f in fields})
    for key, value in results[0].items():
        torch.testing.assert_close(results[1][key], value, msg=str(key))

"""Huber, SmoothL1, PoissonNLL and GaussianNLL rules: roots against torch.func.hessian."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backpack.derivatives.base import IO
from backpack.registry import rule_for

N, D = 4, 3
_f = torch.float64


def _case(module, x, y, var=None):
    return module, x, y, var


def _cases(r):
    torch.manual_seed(0)
    x, y = torch.randn(N, D, dtype=_f), torch.randn(N, D, dtype=_f)
    pos = torch.rand(N, D, dtype=_f) + 0.5
    counts = torch.poisson(torch.full((N, D), 2.0, dtype=_f))
    var = torch.rand(N, D, dtype=_f) + 0.2
    return {
        "huber": _case(nn.HuberLoss(reduction=r, delta=0.7), x, y),
        "smoothl1": _case(nn.SmoothL1Loss(reduction=r, beta=0.5), x, y),
        "poisson-log": _case(nn.PoissonNLLLoss(reduction=r, full=True), x * 0.5, counts),
        "poisson-rate": _case(nn.PoissonNLLLoss(log_input=False, reduction=r), pos, counts),
        "gauss-nd": _case(nn.GaussianNLLLoss(reduction=r), x, y, var),
        "gauss-n1": _case(nn.GaussianNLLLoss(reduction=r, full=True), x, y, var[:, :1]),
        "gauss-n": _case(nn.GaussianNLLLoss(reduction=r, eps=0.5), x, y, var[:, 0]),
    }


IDS = list(_cases("mean"))


def _setup(name, reduction):
    module, x, y, var = _cases(reduction)[name]
    args = (x, y) if var is None else (x, y, var)
    hess = torch.func.hessian(lambda o: module(o, *args[1:]))(x).reshape(N, D, N, D)
    return module, IO(args, None), torch.einsum("nini->ni", hess)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", IDS)
def test_sqrt_hessian_exact(name, reduction):
    module, io, hess = _setup(name, reduction)
    S = rule_for(module).sqrt_hessian(module, io)
    assert S.shape[1:] == io.inputs[0].shape
    flat = S.reshape(S.shape[0], N, D)
    blocks = torch.einsum("cni,cnj->nij", flat, flat)  # per-sample sum_c S_c S_c^T
    torch.testing.assert_close(blocks, torch.diag_embed(hess), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", ["poisson-log", "gauss-nd", "gauss-n1", "gauss-n"])
def test_sqrt_hessian_sampled(name, reduction):
    module, io, hess = _setup(name, reduction)
    torch.manual_seed(1)
    S = rule_for(module).sqrt_hessian_sampled(module, io, 100_000)
    scale = hess.abs().max()
    torch.testing.assert_close((S**2).sum(0), hess, atol=3e-2 * scale, rtol=0)


def test_poisson_rate_sampled_is_fisher():
    module, io, _ = _setup("poisson-rate", "sum")
    x = io.inputs[0]
    torch.manual_seed(1)
    S = rule_for(module).sqrt_hessian_sampled(module, io, 200_000)
    fisher = x / (x + module.eps) ** 2
    torch.testing.assert_close((S**2).sum(0), fisher, atol=3e-2 * fisher.max(), rtol=0)


@pytest.mark.parametrize("name", ["huber", "smoothl1"])
def test_no_likelihood_raises(name):
    module, io, _ = _setup(name, "mean")
    with pytest.raises(NotImplementedError, match=type(module).__name__):
        rule_for(module).sqrt_hessian_sampled(module, io, 3)


def _mlp_problem(name, reduction):
    module, _, y, var = _cases(reduction)[name]
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, D)).to(_f)
    x = torch.randn(N, 5, dtype=_f)
    if name == "poisson-rate":  # positive rates
        model.append(nn.Softplus())
    extra = (y,) if var is None else (y, var)
    return model, module, x, extra


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", IDS)
def test_mlp_against_autograd(name, reduction):
    """BatchGrad, DiagGGNExact and DiagHessian through a small MLP vs. torch.func."""
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad, DiagGGNExact, DiagHessian

    model, module, x, extra = _mlp_problem(name, reduction)
    model, module = extend(model), extend(module)
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    with backpack(BatchGrad(), DiagGGNExact(), DiagHessian()):
        module(model(x), *extra).backward()

    def loss_of(p, xs, targets):
        return module(torch.func.functional_call(model, p, (xs,)), *targets)

    # per-sample gradients (test-side loop over 4 samples); 'mean' of one sample divides by D
    scale = 1.0 / N if reduction == "mean" else 1.0
    grads = [
        torch.func.grad(loss_of)(params, x[i : i + 1], [t[i : i + 1] for t in extra])
        for i in range(N)
    ]
    out = model(x).detach()
    H = torch.func.hessian(lambda o: module(o, *extra))(out).reshape(out.numel(), -1)
    for n in names:
        p = params[n]
        expected = torch.stack([g[n] for g in grads]) * scale
        torch.testing.assert_close(p.grad_batch, expected)
        J = torch.func.jacrev(
            lambda q, n=n: torch.func.functional_call(model, {**params, n: q}, (x,))
        )(p.detach()).reshape(out.numel(), -1)
        ggn = torch.einsum("oi,op,pi->i", J, H, J)
        torch.testing.assert_close(p.diag_ggn_exact.reshape(-1), ggn)
        hess = torch.func.hessian(lambda q, n=n: loss_of({**params, n: q}, x, extra))(p.detach())
        torch.testing.assert_close(p.diag_h.reshape(-1), hess.reshape(p.numel(), -1).diagonal())

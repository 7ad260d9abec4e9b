"""BatchNorm with batch statistics (train mode): whole-batch curvature against dense references.

The oracles in ``tests/oracles.py`` assume independent samples; here the GGN diagonal comes from
the Jacobian of the whole-batch output w.r.t. the parameters and the loss Hessian, the Hessian
diagonal from double backward on the whole-batch loss.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from backpack import backpack, extend
from backpack.extensions import (
    GGNMP,
    HMP,
    KFAC,
    KFLR,
    KFRA,
    BatchDiagGGNExact,
    BatchGrad,
    DiagGGNExact,
    DiagHessian,
    SqrtGGNExact,
    SqrtGGNMC,
)

N = 5


def _mlp() -> tuple[nn.Module, torch.Tensor, int]:
    return (
        nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)),
        (torch.randn(N, 4)),
        3,
    )


def _cnn() -> tuple[nn.Module, torch.Tensor, int]:
    model = nn.Sequential(
        nn.Conv2d(2, 3, 2), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)
    )
    return model, torch.randn(N, 2, 3, 3), 3


MODELS = {"mlp": _mlp, "cnn": _cnn}
LOSSES = ["mse-mean", "mse-sum", "ce-mean", "ce-sum"]


def _problem(model_name: str, loss_name: str):
    torch.manual_seed(0)
    model, x, c = MODELS[model_name]()
    model = model.double().train()
    kind, red = loss_name.split("-")
    if kind == "mse":
        loss_fn, y = nn.MSELoss(reduction=red), torch.randn(N, c, dtype=torch.float64)
    else:
        loss_fn, y = nn.CrossEntropyLoss(reduction=red), torch.randint(0, c, (N,))
    return model, x.double(), y, loss_fn


def _out(model: nn.Module, x):
    def out(p):  # fresh buffers: a train-mode forward updates them in place
        buffers = {k: b.clone() for k, b in model.named_buffers()}
        return functional_call(model, {**p, **buffers}, (x,))

    return out


def _ggn_blocks(model: nn.Module, x, y, loss_fn) -> dict:
    """Whole-batch GGN blocks ``J^T H J`` ``[P, P]`` per parameter name."""
    params, out = {k: p.detach() for k, p in model.named_parameters()}, _out(model, x)
    f = out(params)
    jac = jacrev(out)(params)
    h_out = hessian(lambda o: loss_fn(o, y))(f.detach()).reshape(f.numel(), f.numel())
    return {k: jac[k].reshape(f.numel(), -1).T @ h_out @ jac[k].reshape(f.numel(), -1) for k in jac}


def _refs(model: nn.Module, x, y, loss_fn) -> tuple[dict, dict]:
    """Whole-batch GGN and Hessian diagonals per parameter name."""
    params, out = {k: p.detach() for k, p in model.named_parameters()}, _out(model, x)
    blocks = _ggn_blocks(model, x, y, loss_fn)
    ggn, hdiag = {}, {}
    for k, p in params.items():
        ggn[k] = blocks[k].diagonal().reshape(p.shape)
        h = hessian(lambda q, k=k: loss_fn(out({**params, k: q}), y))(p)
        hdiag[k] = h.reshape(p.numel(), p.numel()).diagonal().reshape(p.shape)
    return ggn, hdiag


@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_diag_ggn_and_hessian_whole_batch(model_name, loss_name):
    model, x, y, loss_fn = _problem(model_name, loss_name)
    ggn, hdiag = _refs(model, x, y, loss_fn)
    model, loss_fn = extend(model), extend(loss_fn)
    loss = loss_fn(model(x), y)
    with backpack(DiagGGNExact(), DiagHessian()):
        loss.backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.diag_ggn_exact, ggn[k], msg=f"GGN {k}")
        torch.testing.assert_close(p.diag_h, hdiag[k], msg=f"Hessian {k}")


@pytest.mark.parametrize("ext", [BatchGrad, BatchDiagGGNExact])
def test_per_sample_extensions_raise(ext):
    model, x, y, loss_fn = _problem("mlp", "mse-mean")
    model, loss_fn = extend(model), extend(loss_fn)
    loss = loss_fn(model(x), y)
    with pytest.raises(NotImplementedError, match=r"BatchNorm1d.*training mode.*eval"):
        with backpack(ext()):
            loss.backward()


@pytest.mark.parametrize("model_name", list(MODELS))
def test_ggnmp_and_hmp_whole_batch(model_name):
    model, x, y, loss_fn = _problem(model_name, "ce-mean")
    params = {k: p.detach() for k, p in model.named_parameters()}

    def loss_of(p):
        buffers = {k: b.clone() for k, b in model.named_buffers()}
        return loss_fn(functional_call(model, {**p, **buffers}, (x,)), y)

    def out_of(p):
        buffers = {k: b.clone() for k, b in model.named_buffers()}
        return functional_call(model, {**p, **buffers}, (x,))

    f = out_of(params)
    h_out = hessian(lambda o: loss_fn(o, y))(f.detach()).reshape(f.numel(), f.numel())
    jac = jacrev(out_of)(params)
    model, loss_fn = extend(model), extend(loss_fn)
    with backpack(GGNMP(), HMP()):
        loss_fn(model(x), y).backward()
    for k, p in model.named_parameters():
        mat = torch.randn(2, *p.shape, dtype=p.dtype)
        j = jac[k].reshape(f.numel(), -1)
        ggn = (j.T @ h_out @ j) @ mat.flatten(1).T
        hess = hessian(lambda q, k=k: loss_of({**params, k: q}))(params[k])
        hmp = hess.reshape(p.numel(), p.numel()) @ mat.flatten(1).T
        torch.testing.assert_close(p.ggnmp(mat), ggn.T.reshape(mat.shape), msg=f"GGNMP {k}")
        torch.testing.assert_close(p.hmp(mat), hmp.T.reshape(mat.shape), msg=f"HMP {k}")


def test_batchnorm_contributions_opt_in():
    """Per-sample contributions ``J_n^T g_n`` (coupled ``g``) that sum to ``.grad``."""
    model, x, y, loss_fn = _problem("mlp", "mse-sum")
    model, loss_fn = extend(model), extend(loss_fn)
    out = model(x)
    g = torch.autograd.grad(loss_fn(out, y), out, retain_graph=True)[0]
    with backpack(BatchGrad(), batchnorm_contributions=True):
        loss_fn(out, y).backward()
    for p in model.parameters():
        torch.testing.assert_close(p.grad_batch.sum(0), p.grad)
    last = model[3]
    hidden = model[:3](x).detach()
    torch.testing.assert_close(last.weight.grad_batch, torch.einsum("no,ni->noi", g, hidden))
    with pytest.raises(NotImplementedError, match="BatchNorm1d"):
        with backpack(BatchDiagGGNExact(), batchnorm_contributions=True):
            loss_fn(model(x), y).backward()


@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_sqrt_ggn_whole_batch(model_name, loss_name):
    """``[C, N, *P]``, entry ``(c, m)`` the whole batch's gradient along root column ``(c, m)``:
    ``V V^T`` is the whole-batch GGN block, layers before and after the BatchNorm alike."""
    model, x, y, loss_fn = _problem(model_name, loss_name)
    blocks = _ggn_blocks(model, x, y, loss_fn)
    model, loss_fn = extend(model), extend(loss_fn)
    with backpack(SqrtGGNExact(), DiagGGNExact()):
        loss_fn(model(x), y).backward()
    for k, p in model.named_parameters():
        v = p.sqrt_ggn_exact
        assert v.shape == (3, N, *p.shape)
        flat = v.reshape(-1, p.numel())
        torch.testing.assert_close(flat.T @ flat, blocks[k], msg=f"SqrtGGN {k}")
        torch.testing.assert_close(v.square().sum((0, 1)), p.diag_ggn_exact)


def test_sqrt_ggn_mc_converges_and_subsampling_raises():
    model, x, y, loss_fn = _problem("mlp", "ce-mean")
    blocks = _ggn_blocks(model, x, y, loss_fn)
    model, loss_fn = extend(model), extend(loss_fn)
    with backpack(SqrtGGNMC(mc_samples=4000)):
        loss_fn(model(x), y).backward()
    for k, p in model.named_parameters():
        assert p.sqrt_ggn_mc.shape == (4000, N, *p.shape)
        flat = p.sqrt_ggn_mc.reshape(-1, p.numel())
        atol = 0.05 * blocks[k].abs().max() + 1e-12  # 0.bias: BatchNorm removes it, block 0
        torch.testing.assert_close(flat.T @ flat, blocks[k], atol=atol, rtol=0, msg=k)
    with pytest.raises(NotImplementedError, match="BatchNorm with batch statistics"):
        with backpack(SqrtGGNExact(subsampling=[0, 2])):
            loss_fn(model(x), y).backward()


@pytest.mark.parametrize("frozen", [False, True], ids=["bn-params", "bn-frozen"])
@pytest.mark.parametrize("ext", [KFAC, KFLR, KFRA])
def test_kronecker_factors_raise(ext, frozen):
    """No Kronecker factors for a train-mode BatchNorm's parameters, nor for the layers in front
    of it (the samples couple)."""
    model, x, y, loss_fn = _problem("mlp", "ce-mean")
    model[1].requires_grad_(not frozen)
    model, loss_fn = extend(model), extend(loss_fn)
    match = "batch statistics" if frozen else "BatchNorm1d.* is in training mode"
    with pytest.raises(NotImplementedError, match=match):
        with backpack(ext()):
            loss_fn(model(x), y).backward()


def test_subclass_of_a_whole_batch_extension_passes_batchnorm():
    """Whether an extension accepts coupled samples is its own property, inherited by a user's
    subclass (the rule never looks at the extension's class name)."""

    class MyDiagGGN(DiagGGNExact):
        pass

    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double())
    lossfunc = extend(nn.CrossEntropyLoss())
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    values = []
    for ext in (DiagGGNExact(), MyDiagGGN()):
        with backpack(ext):
            lossfunc(model(x), y).backward()
        values.append([p.diag_ggn_exact.clone() for p in model.parameters()])
    for a, b in zip(*values):
        torch.testing.assert_close(a, b)
    with (
        pytest.raises(NotImplementedError, match="BatchDiagGGNExact"),
        backpack(BatchDiagGGNExact()),
    ):
        lossfunc(model(x), y).backward()

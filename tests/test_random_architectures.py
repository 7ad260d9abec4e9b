"""Random Sequential architectures drawn by hypothesis, checked against the vmap(grad) oracle."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from backpack import backpack, extend
from backpack.extensions import (
    BatchDiagHessian,
    BatchGrad,
    BatchL2Grad,
    DiagGGNExact,
    DiagHessian,
    SumGradSquared,
    Variance,
)
from tests.cases import LOSSES, make_target
from tests.oracles import assert_first_order, ggn_diag, hessian_diag, per_sample_grads

ACTIVATIONS = [nn.ReLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.Identity, nn.LogSigmoid, nn.SELU]


@st.composite
def architectures(draw):
    """``(layers, input shape)``: optional conv blocks, then dense blocks, ending in 3 outputs."""
    layers: list[nn.Module] = []
    channels = draw(st.integers(1, 3))
    conv_blocks = draw(st.integers(0, 2))
    shape: tuple[int, ...] = (channels, 6, 6) if conv_blocks else (draw(st.integers(1, 6)),)
    for _ in range(conv_blocks):
        out = draw(st.integers(1, 4))
        groups = draw(st.sampled_from([g for g in (1, 2) if channels % g == 0 and out % g == 0]))
        layers.append(nn.Conv2d(channels, out, 3, padding=draw(st.integers(0, 1)), groups=groups))
        layers.append(draw(st.sampled_from(ACTIVATIONS))())
        channels = out
    if conv_blocks:
        layers.append(nn.Flatten())
    for _ in range(draw(st.integers(0, 2))):
        layers.append(nn.LazyLinear(draw(st.integers(1, 6)), bias=draw(st.booleans())))
        layers.append(draw(st.sampled_from(ACTIVATIONS))())
    layers.append(nn.LazyLinear(3))
    return layers, shape


@st.composite
def problems(draw, max_n: int):
    """``(model, lossfunc, x, y)``: a drawn architecture, loss, reduction, batch size and seed."""
    layers, shape = draw(architectures())
    loss = draw(st.sampled_from(sorted(LOSSES)))
    reduction = draw(st.sampled_from(["mean", "sum"]))
    n = draw(st.integers(1, max_n))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = nn.Sequential(*layers).double()
    x = torch.randn(n, *shape, dtype=torch.float64)
    with torch.no_grad():
        y = make_target(loss, model(x))
    return model, LOSSES[loss](reduction=reduction), x, y


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(max_n=4))
def test_random_architecture_first_order(problem):
    model, lossfunc, x, y = problem
    ref = per_sample_grads(model, lossfunc, x, y)
    extend(model)
    with backpack(BatchGrad(), BatchL2Grad(), SumGradSquared(), Variance()):
        lossfunc(model(x), y).backward()
    assert_first_order(dict(model.named_parameters()), ref)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(max_n=3))
def test_random_architecture_second_order(problem):
    model, lossfunc, x, y = problem
    ggn = ggn_diag(model, lossfunc, x, y)
    hess_n = hessian_diag(model, lossfunc, x, y, per_sample=True)
    extend(model)
    extend(lossfunc)
    with backpack(DiagGGNExact(), DiagHessian(), BatchDiagHessian()):
        lossfunc(model(x), y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.diag_ggn_exact, ggn[name])
        torch.testing.assert_close(p.diag_h_batch, hess_n[name])
        torch.testing.assert_close(p.diag_h, hess_n[name].sum(0))

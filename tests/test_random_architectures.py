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


def _problem(draw, build, in_shape: tuple[int, ...], max_n: int):
    """``(model, lossfunc, x, y)``: ``build()`` in float64 with a drawn loss, reduction, batch
    size and seed."""
    loss = draw(st.sampled_from(sorted(LOSSES)))
    reduction = draw(st.sampled_from(["mean", "sum"]))
    n = draw(st.integers(1, max_n))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = build().double()
    x = torch.randn(n, *in_shape, dtype=torch.float64)
    with torch.no_grad():
        y = make_target(loss, model(x))
    return model, LOSSES[loss](reduction=reduction), x, y


@st.composite
def problems(draw, max_n: int):
    """A drawn architecture as a problem (``_problem``)."""
    layers, shape = draw(architectures())
    return _problem(draw, lambda: nn.Sequential(*layers), shape, max_n)


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


# function calls between modules (backpack.engine.ops): drawn steps on a [n, d] activation,
# d even; "gamma"/"beta" read parameters of the container itself
STEPS = ["residual", "scale", "gelu", "tanh", "heads", "cat", "gamma", "beta", "halves",
         "softmax", "slice", "silu_"]  # fmt: skip


class Glue(nn.Module):
    """``Linear(d)``, then the drawn function-call steps (each followed by a Linear for the
    steps that change the width), then ``Linear(3)``."""

    def __init__(self, d_in: int, d: int, steps: list[str]):
        super().__init__()
        self.steps, self.d = steps, d
        self.first, self.last = nn.Linear(d_in, d), nn.Linear(d, 3)
        self.mix = nn.ModuleList(nn.Linear(d, d) for _ in steps)
        self.wide = nn.ModuleList(nn.Linear(2 * d, d) for _ in steps)
        self.gamma, self.beta = nn.Parameter(torch.randn(d)), nn.Parameter(torch.randn(1, d))

    def forward(self, x):
        h = self.first(x)
        n, d = h.shape
        for step, mix, wide in zip(self.steps, self.mix, self.wide):
            if step == "residual":
                h = h + mix(torch.tanh(h))
            elif step == "scale":
                h = mix(h * 0.5 - 1.0)
            elif step == "gelu":
                h = mix(torch.nn.functional.gelu(h))
            elif step == "tanh":
                h = mix(torch.tanh(h))
            elif step == "heads":
                h = mix(h.view(n, 2, d // 2).transpose(1, 2).reshape(n, d))
            elif step == "cat":
                h = wide(torch.cat([h, torch.sin(h)], 1))
            elif step == "gamma":
                h = mix(h * self.gamma)
            elif step == "beta":
                h = mix(torch.sigmoid(h + self.beta))
            elif step == "halves":
                a, b = h.chunk(2, dim=1)
                h = mix(torch.cat([a * b, a + b], 1))
            elif step == "softmax":
                h = mix(torch.softmax(h, dim=1) * h)
            elif step == "slice":
                h = wide(torch.cat([h[:, : d // 2], h[:, d // 2 :], h], 1))
            elif step == "silu_":
                h = mix(h.clone()).mul_(2.0)
        return self.last(h)


@st.composite
def glued(draw, max_n: int):
    """A problem (``_problem``) with function calls between the modules."""
    steps = draw(st.lists(st.sampled_from(STEPS), min_size=1, max_size=3))
    d_in, d = draw(st.integers(1, 4)), 2 * draw(st.integers(1, 3))
    return _problem(draw, lambda: Glue(d_in, d, steps), (d_in,), max_n)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=glued(max_n=3))
def test_random_function_calls_between_modules(problem):
    """First-order quantities, GGN and Hessian diagonals through drawn function calls."""
    model, lossfunc, x, y = problem
    ref = per_sample_grads(model, lossfunc, x, y)
    ggn = ggn_diag(model, lossfunc, x, y)
    hess = hessian_diag(model, lossfunc, x, y)
    extend(model)
    extend(lossfunc)
    exts = [BatchGrad(), BatchL2Grad(), SumGradSquared(), Variance(), DiagGGNExact(), DiagHessian()]
    with backpack(*exts):
        lossfunc(model(x), y).backward()
    params = {k: p for k, p in model.named_parameters() if p.grad is not None}
    assert_first_order(params, {k: ref[k] for k in params})
    for name, p in params.items():
        torch.testing.assert_close(p.diag_ggn_exact, ggn[name])
        torch.testing.assert_close(p.diag_h, hess[name])

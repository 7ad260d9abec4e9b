"""Conv/ConvTranspose rules: Jacobian and weight-Jacobian products against torch.func (V=2)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, jvp, vjp, vmap

from backpack.derivatives.base import IO
from backpack.registry import rule_for
from tests.cases import DTYPE, LAYER_CASES, Problem

V = 2
CONV_CASES = [c for c in LAYER_CASES if c.name.startswith("Conv")]

# configurations beyond the shared cases: (layer, input shape without batch, forward kwargs)
EXTRA = {
    "ConvTranspose1d-outpad-dil": (
        lambda: nn.ConvTranspose1d(2, 3, 3, dilation=3, output_padding=2),
        (2, 5),
        {},
    ),
    "ConvTranspose2d-output_size": (
        lambda: nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1),
        (2, 4, 3),
        {"output_size": (8, 6)},
    ),
    "ConvTranspose3d-pad-dil": (
        lambda: nn.ConvTranspose3d(2, 2, 2, stride=(1, 2, 1), padding=1, dilation=2),
        (2, 3, 3, 4),
        {},
    ),
    "Conv1d-circular-same-even": (
        lambda: nn.Conv1d(2, 3, 4, padding="same", padding_mode="circular"),
        (2, 7),
        {},
    ),
    "Conv2d-reflect-stride": (
        lambda: nn.Conv2d(2, 3, 3, stride=2, padding=(2, 1), padding_mode="reflect"),
        (2, 6, 7),
        {},
    ),
    "Conv3d-replicate-dil": (
        lambda: nn.Conv3d(2, 2, 2, padding=(1, 2, 0), dilation=2, padding_mode="replicate"),
        (2, 4, 5, 4),
        {},
    ),
    "Conv3d-circular": (
        lambda: nn.Conv3d(2, 4, 3, padding=1, padding_mode="circular", groups=2),
        (2, 3, 4, 3),
        {},
    ),
    "Conv3d-same-even": (
        lambda: nn.Conv3d(2, 3, (2, 3, 4), padding="same", dilation=(1, 1, 2)),
        (2, 4, 3, 6),
        {},
    ),
}


def _layers() -> list:
    shared = [pytest.param(case, id=case.name) for case in CONV_CASES]
    return shared + [pytest.param(spec, id=name) for name, spec in EXTRA.items()]


def _setup(spec, n=3):
    """Layer (float64), input, forward kwargs and the IO record of its call."""
    if isinstance(spec, tuple):
        make, shape, kwargs = spec
        torch.manual_seed(0)
        layer = make().to(DTYPE)
        x = torch.randn(n, *shape, dtype=DTYPE)
    else:
        model, _, x, _ = Problem(spec, "mse", "sum", n).build()
        layer, kwargs = model[0], {}
    out = layer(x, **kwargs).detach()
    return layer, x, kwargs, IO(inputs=(x,), output=out, kwargs=kwargs)


LAYERS = _layers()


@pytest.mark.parametrize("spec", LAYERS)
def test_jacobian_products(spec):
    layer, x, kwargs, io = _setup(spec)
    rule = rule_for(layer)
    f = lambda t: layer(t, **kwargs)  # noqa: E731
    out, pull = vjp(f, x)
    mat_out = torch.randn(V, *out.shape, dtype=DTYPE)
    expected = vmap(pull)(mat_out)[0]
    torch.testing.assert_close(rule.jac_t_mat_prod(layer, io, mat_out), expected)

    mat_in = torch.randn(V, *x.shape, dtype=DTYPE)
    expected = torch.stack([jvp(f, (x,), (m,))[1] for m in mat_in])  # tangents: no bias
    torch.testing.assert_close(rule.jac_mat_prod(layer, io, mat_in), expected)


@pytest.mark.parametrize("spec", LAYERS)
def test_param_jac_t_mat_prod(spec):
    """Per-sample and summed VJPs of weight and bias for V=2 output-side vectors."""
    layer, x, kwargs, io = _setup(spec)
    rule = rule_for(layer)
    params = {k: p.detach() for k, p in layer.named_parameters()}
    mat = torch.randn(V, *layer(x, **kwargs).shape, dtype=DTYPE)

    def sample_vjp(xn, mn):  # [*in], [V, *out] -> {name: [V, *param]}
        f = lambda p: functional_call(layer, p, (xn.unsqueeze(0),), kwargs)  # noqa: E731
        _, pull = vjp(f, params)
        return vmap(pull)(mn.unsqueeze(1))[0]

    per_sample = vmap(sample_vjp, in_dims=(0, 1), out_dims=1)(x, mat)  # {name: [V, N, *param]}
    for name in params:
        got = rule.param_jac_t_mat_prod(layer, io, mat, name, sum_batch=False)
        torch.testing.assert_close(got, per_sample[name], msg=lambda m: f"{name}: {m}")
        got = rule.param_jac_t_mat_prod(layer, io, mat, name, sum_batch=True)
        torch.testing.assert_close(got, per_sample[name].sum(1), msg=lambda m: f"{name}: {m}")

"""Rules of parameter-free layers against torch.func: ``jac_t_mat_prod`` (vjp), ``jac_mat_prod``
(jvp) and ``residual_diag`` (double backward), in float64 with V=3, N=2."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import jvp, vjp

from backpack.custom_module.permute import Permute
from backpack.derivatives.base import IO
from backpack.registry import rule_for

V, N = 3, 2
DTYPE = torch.float64


# (id, module factory, input shape without batch); in eval mode unless the id says "train"
CASES = [
    # elementwise
    ("ReLU", lambda: nn.ReLU(), (3, 4)),
    ("ReLU-inplace", lambda: nn.ReLU(inplace=True), (3, 4)),
    ("Sigmoid", lambda: nn.Sigmoid(), (5,)),
    ("Tanh", lambda: nn.Tanh(), (2, 3, 2)),
    ("LeakyReLU", lambda: nn.LeakyReLU(0.1), (5,)),
    ("LeakyReLU-inplace", lambda: nn.LeakyReLU(0.2, inplace=True), (5,)),
    ("LeakyReLU-negslope", lambda: nn.LeakyReLU(-0.3), (5,)),
    ("LogSigmoid", lambda: nn.LogSigmoid(), (4, 2)),
    ("ELU", lambda: nn.ELU(0.7), (6,)),
    ("ELU-inplace", lambda: nn.ELU(1.3, inplace=True), (6,)),
    ("SELU", lambda: nn.SELU(), (6,)),
    ("SELU-inplace", lambda: nn.SELU(inplace=True), (6,)),
    ("Hardtanh", lambda: nn.Hardtanh(-0.5, 0.8), (6,)),
    ("ReLU6-inplace", lambda: nn.ReLU6(inplace=True), (6,)),
    ("CELU", lambda: nn.CELU(0.6), (6,)),
    ("CELU-inplace", lambda: nn.CELU(1.4, inplace=True), (6,)),
    ("Threshold", lambda: nn.Threshold(0.1, 20.0), (6,)),
    ("Threshold-inplace", lambda: nn.Threshold(-0.2, -3.0, inplace=True), (6,)),
    ("RReLU", lambda: nn.RReLU(0.1, 0.4), (3, 4)),
    ("RReLU-inplace", lambda: nn.RReLU(inplace=True), (3, 4)),
    ("RReLU-train", lambda: nn.RReLU(0.1, 0.4), (3, 4)),
    ("RReLU-train-inplace", lambda: nn.RReLU(inplace=True), (3, 4)),
    ("SiLU-inplace", lambda: nn.SiLU(inplace=True), (6,)),
    ("Mish-inplace", lambda: nn.Mish(inplace=True), (6,)),
    ("Hardswish-inplace", lambda: nn.Hardswish(inplace=True), (2, 6)),
    ("Identity", lambda: nn.Identity(), (4,)),
    ("Dropout-train", lambda: nn.Dropout(0.4), (3, 5)),
    ("Dropout-train-inplace", lambda: nn.Dropout(0.4, inplace=True), (3, 5)),
    ("Dropout-eval", lambda: nn.Dropout(0.4), (3, 5)),
    ("Dropout2d-train", lambda: nn.Dropout2d(0.5), (4, 3, 3)),
    # shape ops
    ("Flatten", lambda: nn.Flatten(), (2, 3, 4)),
    ("Flatten-2", lambda: nn.Flatten(2), (2, 3, 4)),
    ("Flatten-1-2", lambda: nn.Flatten(1, -2), (2, 3, 4)),
    ("Unflatten", lambda: nn.Unflatten(1, (2, 3)), (6, 2)),
    ("Permute", lambda: Permute(0, 3, 1, 2), (2, 3, 4)),
    ("Permute-negative", lambda: Permute(0, -1, 1, -2), (2, 3, 4)),
    ("Permute-transpose", lambda: Permute(1, -1, init_transpose=True), (2, 3, 4)),
    # max pooling
    ("MaxPool1d", lambda: nn.MaxPool1d(3, stride=2, padding=1), (2, 9)),
    ("MaxPool1d-dil-ceil", lambda: nn.MaxPool1d(2, stride=2, dilation=2, ceil_mode=True), (2, 10)),
    ("MaxPool2d", lambda: nn.MaxPool2d(2), (2, 4, 6)),
    ("MaxPool2d-pad-ceil", lambda: nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True), (2, 7, 8)),
    ("MaxPool2d-overlap-dil", lambda: nn.MaxPool2d((2, 3), stride=1, dilation=(2, 1)), (2, 6, 5)),
    ("MaxPool3d", lambda: nn.MaxPool3d(2, stride=(1, 2, 2), padding=1), (2, 3, 4, 5)),
    ("MaxPool2d-return_indices", lambda: nn.MaxPool2d(2, return_indices=True), (2, 4, 4)),
    ("AdaptiveMaxPool1d", lambda: nn.AdaptiveMaxPool1d(3), (2, 7)),
    ("AdaptiveMaxPool2d", lambda: nn.AdaptiveMaxPool2d((3, 4)), (2, 7, 9)),
    ("AdaptiveMaxPool3d", lambda: nn.AdaptiveMaxPool3d((2, None, 3)), (2, 3, 4, 5)),
    # average pooling
    (
        "AvgPool1d",
        lambda: nn.AvgPool1d(3, 2, padding=1, count_include_pad=False, ceil_mode=True),
        (2, 8),
    ),
    ("AvgPool2d", lambda: nn.AvgPool2d(2), (2, 4, 6)),
    (
        "AvgPool2d-nopad-ceil",
        lambda: nn.AvgPool2d(3, 2, count_include_pad=False, ceil_mode=True),
        (2, 8, 7),
    ),
    (
        "AvgPool2d-pad-divisor",
        lambda: nn.AvgPool2d((3, 2), stride=1, padding=1, divisor_override=4),
        (2, 5, 4),
    ),
    (
        "AvgPool3d",
        lambda: nn.AvgPool3d(2, padding=1, ceil_mode=True, count_include_pad=False),
        (2, 3, 4, 5),
    ),
    ("AdaptiveAvgPool1d", lambda: nn.AdaptiveAvgPool1d(4), (2, 7)),
    ("AdaptiveAvgPool2d", lambda: nn.AdaptiveAvgPool2d((3, 5)), (2, 7, 9)),
    ("AdaptiveAvgPool3d", lambda: nn.AdaptiveAvgPool3d((2, 3, None)), (2, 3, 5, 4)),
    # padding
    ("ZeroPad1d", lambda: nn.ZeroPad1d((1, 2)), (2, 4)),
    ("ZeroPad2d", lambda: nn.ZeroPad2d((1, 0, 2, 1)), (2, 3, 4)),
    ("ZeroPad3d", lambda: nn.ZeroPad3d(1), (2, 2, 3, 2)),
    ("ConstantPad1d", lambda: nn.ConstantPad1d(2, 1.5), (2, 4)),
    ("ConstantPad2d-crop", lambda: nn.ConstantPad2d((1, -1, -1, 2), 1.5), (2, 3, 4)),
    ("ConstantPad3d", lambda: nn.ConstantPad3d((1, 0, 0, 1, 1, 1), -2.0), (2, 2, 3, 2)),
    ("ReflectionPad1d", lambda: nn.ReflectionPad1d((2, 1)), (2, 4)),
    ("ReflectionPad2d", lambda: nn.ReflectionPad2d((1, 2, 2, 0)), (2, 3, 4)),
    ("ReflectionPad3d", lambda: nn.ReflectionPad3d(1), (2, 2, 3, 3)),
    ("ReplicationPad1d", lambda: nn.ReplicationPad1d((3, 1)), (2, 4)),
    ("ReplicationPad2d", lambda: nn.ReplicationPad2d(2), (2, 3, 4)),
    ("ReplicationPad3d", lambda: nn.ReplicationPad3d((1, 0, 1, 2, 0, 1)), (2, 2, 3, 3)),
    ("CircularPad2d", lambda: nn.CircularPad2d((1, 2, 2, 1)), (2, 3, 4)),
]

SEED = 7


def _forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The module's (first) output, same dropout mask every call; the input stays intact (an
    in-place module runs as its out-of-place copy: torch has no forward AD for some in-place
    ops, e.g. ``rrelu_with_noise_``)."""
    if getattr(module, "inplace", False):
        module = copy.copy(module)
        module.inplace = False
    torch.manual_seed(SEED)
    out = module(x)
    return out[0] if isinstance(out, tuple) else out


def _setup(name, make, shape):
    torch.manual_seed(0)
    module = make().to(DTYPE).train("train" in name)
    x = torch.randn(N, *shape, dtype=DTYPE)
    rule = rule_for(module)
    assert rule is not None, f"no rule for {type(module).__name__}"
    # the record as the engine stores it: after an in-place layer its input holds the output,
    # unless the rule asks for a copy of the input (Rule.inplace_needs_input)
    stored = x.clone()
    torch.manual_seed(SEED)
    with torch.no_grad():
        out = module(stored)
    out = out[0] if isinstance(out, tuple) else out
    kept = x.clone() if getattr(module, "inplace", False) and rule.inplace_needs_input else stored
    io = IO((kept,), out if rule.needs_output else None)
    rule.check(module, io, None)
    return module, rule, io, x, out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_jac_t_mat_prod_and_jac_mat_prod(case):
    module, rule, io, x, out = _setup(*case)
    f = lambda t: _forward(module, t)  # noqa: E731
    torch.testing.assert_close(f(x), out)

    mat_out = torch.randn(V, *out.shape, dtype=DTYPE)
    _, pullback = vjp(f, x)
    want = torch.stack([pullback(m)[0] for m in mat_out])
    torch.testing.assert_close(rule.jac_t_mat_prod(module, io, mat_out), want)

    mat_in = torch.randn(V, *x.shape, dtype=DTYPE)
    want = torch.stack([jvp(f, (x,), (m,))[1] for m in mat_in])
    torch.testing.assert_close(rule.jac_mat_prod(module, io, mat_in), want)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_residual_diag(case):
    """``residual_diag == diag(d2 (f(x) . g) / dx2)``; None exactly where that is zero."""
    module, rule, io, x, out = _setup(*case)
    g = torch.randn_like(out)
    xg = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad((_forward(module, xg) * g).sum(), xg, create_graph=True)
    # elementwise layers: grad_i depends on x_i only, so the sum's gradient is the diagonal
    if grad.requires_grad:
        (want,) = torch.autograd.grad(grad.sum(), xg, allow_unused=True, materialize_grads=True)
    else:  # the gradient does not depend on x (Identity)
        want = torch.zeros_like(x)
    got = rule.residual_diag(module, io, g)
    if got is None:
        assert torch.count_nonzero(want) == 0
    else:
        torch.testing.assert_close(got, want)


def test_flatten_batch_axis_raises():
    module, x = nn.Flatten(0), torch.randn(N, 3, dtype=DTYPE)
    with pytest.raises(ValueError, match="batch axis"):
        rule_for(module).check(module, IO((x,), None), None)

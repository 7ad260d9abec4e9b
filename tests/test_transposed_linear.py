"""Hugging Face's ``Conv1D`` (a Linear layer with its weight stored ``[in, out]``, GPT-2's
projections) has a hand-written rule, registered by name: every extension equals the same
model built from ``nn.Linear`` with the weight transposed (Kronecker factors ``[A, G]``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backpack import backpack, extend
from backpack.derivatives.linear import TransposedLinearRule
from backpack.extensions import (
    KFAC,
    KFLR,
    BatchGrad,
    BatchL2Grad,
    DiagGGNExact,
    DiagHessian,
    SqrtGGNExact,
    SumGradSquared,
    Variance,
)
from backpack.registry import rule_for
from tests.zoo import import_torchvision

D = torch.float64


def _conv1d():
    import_torchvision()  # transformers imports torchvision
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def _pair():
    torch.manual_seed(0)
    conv = _conv1d()
    hf = nn.Sequential(conv(5, 4), nn.Tanh(), conv(3, 5)).to(D)  # Conv1D(nf=out, nx=in)
    ref = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(D)
    with torch.no_grad():
        for i in (0, 2):
            ref[i].weight.copy_(hf[i].weight.T)
            ref[i].bias.copy_(hf[i].bias)
    return hf, ref


def test_rule_registered_by_name():
    assert isinstance(rule_for(_conv1d()(3, 2)), TransposedLinearRule)


@pytest.mark.parametrize("ext", [BatchGrad, BatchL2Grad, SumGradSquared, Variance, DiagGGNExact,
                                 DiagHessian, SqrtGGNExact, KFLR, KFAC])  # fmt: skip
def test_equals_linear_with_transposed_weight(ext):
    hf, ref = _pair()
    x, y = torch.randn(6, 2, 4, dtype=D), torch.randint(0, 3, (6, 2))
    results = []
    for model in (hf, ref):
        model, lossfunc = extend(model), extend(nn.CrossEntropyLoss())
        torch.manual_seed(1)  # KFAC's samples
        with backpack(ext()):
            lossfunc(model(x).flatten(0, 1), y.flatten()).backward()
        results.append([getattr(p, ext().savefield) for p in model.parameters()])
    for (name, p), got, want in zip(hf.named_parameters(), *results):
        if name.endswith("weight") and ext in (KFLR, KFAC):
            assert [f.shape for f in got] == [f.shape for f in want[::-1]]
            for g, w in zip(got, want[::-1]):  # [A, G] against Linear's [G, A]
                torch.testing.assert_close(g, w)
        elif name.endswith("weight") and ext is not BatchL2Grad:
            torch.testing.assert_close(got, want.transpose(-1, -2), msg=name)
        elif ext is KFLR or ext is KFAC:
            torch.testing.assert_close(got[0], want[0], msg=name)
        else:
            torch.testing.assert_close(got, want, msg=name)

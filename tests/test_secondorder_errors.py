"""Second-order extensions on inputs they cannot handle: clear errors, never wrong numbers."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from backpack import backpack, extend
from backpack.extensions import DiagGGNExact, DiagHessian
from tests.oracles import ggn_diag


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.lin2(torch.relu(self.lin1(x)))


def _data():
    torch.manual_seed(0)
    return torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 3, (3,))


def test_function_call_outside_an_extended_model_names_module_and_remedy():
    """Only the layers are extended, not the model: its ``torch.relu`` is not recorded."""
    model, lossfunc = Functional().double(), extend(nn.CrossEntropyLoss())
    extend(model.lin1), extend(model.lin2)
    x, y = _data()
    with pytest.raises(RuntimeError, match=r"(?s)Linear\(in_features=4.*extend\(model\)"):
        with backpack(DiagGGNExact()):
            lossfunc(model(x), y).backward()


def test_unextended_loss_says_extend_lossfunc():
    model = extend(nn.Sequential(nn.Linear(4, 3)).double())
    x, y = _data()
    with pytest.raises(RuntimeError, match=r"extend\(lossfunc\)"):
        with backpack(DiagGGNExact()):
            nn.CrossEntropyLoss()(model(x), y).backward()


def test_reduction_none_is_rejected():
    model = extend(nn.Sequential(nn.Linear(4, 3)).double())
    lossfunc = extend(nn.CrossEntropyLoss(reduction="none"))
    x, y = _data()
    with pytest.raises(ValueError, match="reduction"):
        with backpack(DiagGGNExact()):
            lossfunc(model(x), y).sum().backward()


def test_scaled_loss_warns_and_scales():
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(4, 3)).double())
    lossfunc = extend(nn.CrossEntropyLoss())
    x, y = _data()
    with pytest.warns(UserWarning, match="modified"):
        with backpack(DiagGGNExact()):
            (3.0 * lossfunc(model(x), y)).backward()
    ref = ggn_diag(model, lossfunc, x, y)
    torch.testing.assert_close(model[0].weight.diag_ggn_exact, 3.0 * ref["0.weight"])
    with pytest.raises(ValueError, match="multiplied by -1.0"):
        with backpack(DiagHessian()):
            (-lossfunc(model(x), y)).backward()


def test_unknown_module_raises_for_second_order_when_strict():
    class Scale(nn.Module):
        def forward(self, x):
            return 2 * x

    model = extend(nn.Sequential(nn.Linear(4, 3), Scale()).double())
    lossfunc = extend(nn.CrossEntropyLoss())
    x, y = _data()
    with pytest.raises(NotImplementedError, match="DiagGGNExact: no rule for module type Scale"):
        with backpack(DiagGGNExact(), strict=True):
            lossfunc(model(x), y).backward()


def test_two_losses_add_their_curvature():
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(4, 3)).double())
    ce, mse = extend(nn.CrossEntropyLoss()), extend(nn.MSELoss())
    x, y = _data()
    target = torch.randn(3, 3, dtype=torch.float64)
    with backpack(DiagGGNExact()):
        out = model(x)
        (ce(out, y) + mse(out, target)).backward()
    ref = ggn_diag(model, ce, x, y)["0.weight"] + ggn_diag(model, mse, x, target)["0.weight"]
    torch.testing.assert_close(model[0].weight.diag_ggn_exact, ref)


def test_regulariser_added_to_the_loss_warns_naming_the_parameter():
    model = extend(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double())
    lossfunc = extend(nn.CrossEntropyLoss())
    x, y = _data()
    with pytest.warns(UserWarning, match=r"(?s)'weight' of Linear\(in_features=5.*regulariser"):
        with backpack(DiagGGNExact()):
            (lossfunc(model(x), y) + 0.1 * model[2].weight.square().sum()).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an untouched loss: no warning, no stale hooks
        with backpack(DiagGGNExact()):
            lossfunc(model(x), y).backward()
        with backpack(DiagGGNExact()):  # backward to the inputs only: watches are dropped
            torch.autograd.backward(lossfunc(model(x), y), inputs=[model[0].bias])
        lossfunc(model(x), y).backward()
    assert all(not p._backward_hooks for p in model.parameters())

"""What clients of BackPACK 1.7 (laplace-torch) rely on: ``memory_cleanup``, ``CTX.remove_hooks``,
re-extending after the ``_backpack_extend`` flag was reset, identity views before the loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backpack import backpack, extend, memory_cleanup
from backpack.context import CTX
from backpack.custom_module.branching import SumModule
from backpack.engine.hooks import _forward_hook
from backpack.extensions import KFLR, KFRA, BatchGrad, DiagGGNExact
from tests.oracles import ggn_diag


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    return model, nn.CrossEntropyLoss(), x, y


def _n_hooks(model: nn.Module) -> list[int]:
    return [sum(h is _forward_hook for h in m._forward_hooks.values()) for m in model.modules()]


def _jacobian_row(model: nn.Module, x: torch.Tensor, i: int) -> list[torch.Tensor]:
    """``d out[:, i] / d theta`` per sample, by BatchGrad (laplace-torch's ``jacobians``)."""
    out = model(x)
    with backpack(BatchGrad()):
        out[:, i].sum().backward()
    return [p.grad_batch.clone() for p in model.parameters()]


def _reset(model: nn.Module) -> None:
    """What laplace-torch does after each Jacobian: hooks off, flag reset, stored IO freed."""
    CTX.remove_hooks()
    for m in model.modules():
        m._backpack_extend = False
        memory_cleanup(m)


@pytest.mark.parametrize("remove", [False, True], ids=["flag-reset", "remove-hooks"])
def test_reextend_installs_one_hook(remove):
    model, _, x, _ = _problem()
    extend(model)
    ref = _jacobian_row(model, x, 1)
    for _ in range(3):
        if remove:
            _reset(model)
        else:
            for m in model.modules():
                m._backpack_extend = False
        extend(model)
        assert max(_n_hooks(model)) == 1
        for a, b in zip(_jacobian_row(model, x, 1), ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_jacobian_matches_autograd_after_reextends():
    model, _, x, _ = _problem()
    for _ in range(4):
        extend(model)
        rows = _jacobian_row(model, x, 2)
        _reset(model)
    params = {k: p.detach() for k, p in model.named_parameters()}

    def out2(p, xn):
        return torch.func.functional_call(model, p, (xn.unsqueeze(0),))[0, 2]

    ref = torch.func.vmap(torch.func.grad(out2), in_dims=(None, 0))(params, x)
    for name, row in zip(params, rows):
        torch.testing.assert_close(row, ref[name])


def test_remove_hooks_leaves_a_plain_model():
    model, lossfunc, x, y = _problem()
    extend(model), extend(lossfunc)
    CTX.remove_hooks()
    assert max(_n_hooks(model)) == 0 and max(_n_hooks(nn.Sequential(lossfunc))) == 0
    assert model[0]._backpack_extend and lossfunc._backpack_extend  # the flags stay, as in 1.7
    with pytest.warns(UserWarning, match="no extended module"):
        with backpack(BatchGrad()):
            lossfunc(model(x), y).backward()
    assert not hasattr(model[0].weight, "grad_batch")


def test_memory_cleanup_frees_the_records():
    model, lossfunc, x, y = _problem()
    extend(model), extend(lossfunc)
    loss = lossfunc(model(x), y)
    assert model[0].__dict__["_backpack_calls"]
    memory_cleanup(model[0])
    assert not model[0].__dict__["_backpack_calls"]
    with pytest.raises(RuntimeError, match="memory_cleanup"):
        with backpack(BatchGrad()):
            loss.backward()


@pytest.mark.parametrize("view", ["view", "reshape", "view-chain", "squeeze", "expand"])
def test_identity_view_before_the_loss(view):
    """laplace-torch feeds ``f.view(-1, f.size(-1))`` to the loss: second order passes it."""
    model, lossfunc, x, y = _problem()
    model = nn.Sequential(model[0], _ViewTwice(), *model[1:])  # a view inside the model, too
    extend(model), extend(lossfunc)
    out = model(x)
    f = {
        "view": lambda o: o.view(-1, o.size(-1)),
        "reshape": lambda o: o.reshape(o.shape),
        "view-chain": lambda o: o.view(-1, 3).view(6, 3),
        "squeeze": lambda o: o.squeeze(),
        "expand": lambda o: o.expand(6, 3),
    }[view](out)
    with backpack(DiagGGNExact(), KFLR(), KFRA()):
        lossfunc(f, y).backward()
    ref = ggn_diag(model, lossfunc, x, y)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.diag_ggn_exact, ref[name])
        assert len(p.kflr) == len(p.kfra) == p.dim()


class _ViewTwice(nn.Module):
    """``x + x.view_as(x)``: a view consumed by a module along with its base (KFRA: a fork)."""

    def __init__(self):
        super().__init__()
        self.sum = SumModule()

    def forward(self, x):
        return self.sum(x, x.view_as(x))

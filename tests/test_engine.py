"""The engine: context semantics, argument checks, hooks, records' lifetime, memory."""

from __future__ import annotations

import copy
import gc
import logging

import pytest
import torch
from torch import nn

from backpack import backpack, disable, extend
from backpack.extensions import BatchGrad, BatchL2Grad, SumGradSquared, Variance
from tests.oracles import live_records, per_sample_grads


def _mlp(inplace: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=inplace), nn.Linear(5, 3)).double()


def _data(n: int = 3):
    torch.manual_seed(1)
    return torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,))


class Residual(nn.Module):
    """``x + lin2(relu(lin1(x)))`` with functional calls between modules."""

    def __init__(self):
        super().__init__()
        self.lin1, self.lin2, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = x + self.lin2(torch.relu(self.lin1(x)))
        return self.head(h.view(h.shape[0], -1) * 2.0)


@pytest.mark.parametrize(
    "bad, match",
    [
        ((BatchGrad,), "Instantiate it"),
        ((BatchGrad(), 3), "received 3"),
        ((BatchGrad(), BatchGrad()), "both write 'grad_batch'"),
    ],
)
def test_invalid_arguments(bad, match):
    with pytest.raises(ValueError, match=match):
        backpack(*bad)


def test_nested_contexts_replace_then_restore():
    model, lossfunc = extend(_mlp()), extend(nn.CrossEntropyLoss())
    x, y = _data()
    with backpack(BatchGrad()):
        with backpack(BatchL2Grad()):
            lossfunc(model(x), y).backward()
        p = model[0].weight
        assert hasattr(p, "batch_l2") and not hasattr(p, "grad_batch")
        lossfunc(model(x), y).backward()
        assert hasattr(p, "grad_batch")


def test_extension_hook_once_per_module_in_backward_order():
    model, lossfunc = extend(_mlp()), extend(nn.CrossEntropyLoss())
    x, y = _data()
    seen = []
    with backpack(BatchGrad(), extension_hook=seen.append):
        lossfunc(model(x), y).backward()
    assert seen == [lossfunc, model[2], model[1], model[0]]


def test_extension_hook_sees_quantities_and_can_compact_them():
    model, lossfunc = extend(_mlp()), extend(nn.CrossEntropyLoss())
    x, y = _data()
    total = []

    def hook(module):
        for p in module.parameters(recurse=False):
            total.append(p.batch_l2.sum())
            del p.batch_l2

    with backpack(BatchL2Grad(), extension_hook=hook):
        lossfunc(model(x), y).backward()
    assert len(total) == 4 and not hasattr(model[0].weight, "batch_l2")


def test_debug_logs_what_runs_where(caplog):
    model, lossfunc = extend(_mlp()), extend(nn.CrossEntropyLoss())
    x, y = _data()
    with caplog.at_level(logging.INFO, logger="backpack"):
        with backpack(BatchGrad(), debug=True):
            lossfunc(model(x), y).backward()
    assert "Running extension BatchGrad() on Linear" in caplog.text


def test_retain_graph_keeps_records_for_another_backward():
    model, lossfunc = extend(_mlp()), extend(nn.CrossEntropyLoss())
    x, y = _data()
    loss = lossfunc(model(x), y)
    with backpack(BatchGrad(), retain_graph=True):
        loss.backward(retain_graph=True)
    first = model[0].weight.grad_batch.clone()
    with backpack(BatchL2Grad()):
        loss.backward()
    torch.testing.assert_close(model[0].weight.batch_l2, first.flatten(1).square().sum(1))
    assert not live_records()


def test_second_backward_without_retain_graph_says_what_to_do():
    model, lossfunc = extend(_mlp()), extend(nn.CrossEntropyLoss())
    x, y = _data()
    loss = lossfunc(model(x), y)
    with backpack(BatchGrad()):
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="retain_graph=True"):
            loss.backward()


def test_disable_stores_nothing_and_warns_that_nothing_was_computed():
    model, lossfunc = extend(_mlp()), extend(nn.CrossEntropyLoss())
    x, y = _data()
    with disable():
        assert not disable.should_store_io()
        loss = lossfunc(model(x), y)
    assert disable.should_store_io()
    assert not live_records()
    with pytest.warns(UserWarning, match="computed nothing"):
        with backpack(BatchGrad()):
            loss.backward()
    assert not hasattr(model[0].weight, "grad_batch")


def test_unextended_model_warns_on_exit():
    model, lossfunc = _mlp(), nn.CrossEntropyLoss()
    x, y = _data()
    with pytest.warns(UserWarning, match=r"extend\(model\)"):
        with backpack(BatchGrad()):
            lossfunc(model(x), y).backward()


def test_records_freed_after_backward_and_never_leak_without_backward():
    model, lossfunc = extend(_mlp()), extend(nn.CrossEntropyLoss())
    x, y = _data()
    loss = lossfunc(model(x), y)
    assert len(live_records()) == 4  # Linear, ReLU, Linear, loss
    with backpack(BatchGrad()):
        loss.backward()
    assert not live_records()
    out = model(x)  # a forward that is never differentiated
    assert len(live_records()) == 3
    del out
    assert not live_records()
    lossfunc(model(x), y).backward()  # plain backward frees them too
    assert not live_records()


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(not hasattr(__import__("os"), "sysconf"), reason="needs /proc")
def test_memory_flat_over_200_iterations():
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(64, 128), nn.ReLU(inplace=True), nn.Linear(128, 10)))
    lossfunc = extend(nn.CrossEntropyLoss())
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))

    def step(i):
        opt.zero_grad()
        exts = [BatchGrad(), Variance()] if i % 2 else []
        with backpack(*exts):
            lossfunc(model(x), y).backward()
        model(x)  # an undifferentiated forward every step
        opt.step()

    for i in range(20):
        step(i)
    gc.collect()
    tensors_before = sum(isinstance(o, torch.Tensor) for o in gc.get_objects())
    rss_before = _rss_mb()
    for i in range(200):
        step(i)
    gc.collect()
    tensors_after = sum(isinstance(o, torch.Tensor) for o in gc.get_objects())
    assert tensors_after <= tensors_before
    assert _rss_mb() - rss_before < 20
    assert not live_records()


def test_extend_is_idempotent_and_skips_containers():
    model = _mlp()
    extend(extend(model))
    assert len(model[0]._forward_hooks) == 1
    # Sequential is a container: only the hook recording the function calls of its forward
    assert [h.__name__ for h in model._forward_hooks.values()] == ["root_hook"]


def test_frozen_parameters_get_nothing():
    model, lossfunc = extend(_mlp()), extend(nn.CrossEntropyLoss())
    model[0].bias.requires_grad_(False)
    x, y = _data()
    with backpack(BatchGrad()):
        lossfunc(model(x), y).backward()
    assert not hasattr(model[0].bias, "grad_batch") and hasattr(model[0].weight, "grad_batch")


def test_autograd_grad_inside_context():
    model, lossfunc = extend(_mlp()), extend(nn.CrossEntropyLoss())
    x, y = _data()
    with backpack(BatchGrad()):
        grads = torch.autograd.grad(lossfunc(model(x), y), list(model.parameters()))
    assert model[0].weight.grad is None
    torch.testing.assert_close(model[0].weight.grad_batch.sum(0), grads[0])


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3, dtype=torch.float64))

    def forward(self, x):
        return x * self.scale


def test_unknown_parametrised_module_warns_and_strict_raises():
    model = extend(nn.Sequential(_mlp(), Unknown()))
    lossfunc = extend(nn.CrossEntropyLoss())
    x, y = _data()
    with pytest.warns(UserWarning, match="no rule for module type Unknown"):
        with backpack(BatchGrad()):
            lossfunc(model(x), y).backward()
    assert hasattr(model[0][0].weight, "grad_batch")
    assert hasattr(model[1].scale, "grad_batch")  # by the automatic rule
    with pytest.raises(NotImplementedError, match="Unknown"):
        with backpack(BatchGrad(), strict=True):
            lossfunc(model(x), y).backward()


@pytest.mark.parametrize("inplace", [False, True])
def test_first_order_on_any_graph(inplace):
    """Residual additions, functional calls, in-place ReLU: first order needs only output grads."""
    torch.manual_seed(0)
    model = Residual().double()
    if inplace:
        model = nn.Sequential(_mlp(inplace=True), nn.Linear(3, 4), model).double()
    lossfunc = nn.CrossEntropyLoss()
    x, y = _data(5)
    ref = per_sample_grads(model, lossfunc, x, y)
    extend(model)
    with backpack(BatchGrad(), BatchL2Grad(), SumGradSquared(), Variance()):
        lossfunc(model(x), y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad_batch, ref[name])
        torch.testing.assert_close(p.batch_l2, ref[name].flatten(1).square().sum(1))
        torch.testing.assert_close(p.variance, ref[name].var(0, unbiased=False))


def test_reduction_none_with_backward_of_ones():
    model = extend(_mlp())
    x, y = _data()
    lossfunc = nn.CrossEntropyLoss(reduction="none")
    with backpack(BatchGrad()):
        lossfunc(model(x), y).backward(torch.ones(3, dtype=torch.float64))
    ref = per_sample_grads(model, nn.CrossEntropyLoss(reduction="sum"), x, y)
    torch.testing.assert_close(model[0].weight.grad_batch, ref["0.weight"])


def test_module_reuse_sums_the_contributions_of_every_call():
    """``Sequential(lin, relu, lin)``: per-sample gradients of the shared weights (details and
    every extension: tests/test_reuse.py); the next pass is independent."""
    lin = nn.Linear(4, 4).double()
    model, lossfunc = extend(nn.Sequential(lin, nn.ReLU(), lin)), extend(nn.CrossEntropyLoss())
    x, y = _data()
    y = y % 4
    # on a copy: functional_call restores a module registered twice (Sequential(lin, ..,
    # lin)) with the tensors it swapped in, not the parameters
    ref = per_sample_grads(copy.deepcopy(model), lossfunc, x, y)
    with backpack(BatchGrad(), BatchL2Grad()):
        lossfunc(model(x), y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad_batch, ref[name])
        torch.testing.assert_close(p.batch_l2, ref[name].flatten(1).square().sum(1))
    other = extend(_mlp())
    with backpack(BatchGrad()):
        lossfunc(other(x), y % 3).backward()
    ref = per_sample_grads(other, lossfunc, x, y % 3)
    torch.testing.assert_close(other[0].weight.grad_batch, ref["0.weight"])


@pytest.mark.parametrize("layer", [nn.Linear(4, 3), nn.Conv1d(4, 3, 1)])
def test_grad_batch_buffer_reused_only_when_nobody_else_sees_it(layer):
    model, lossfunc = extend(nn.Sequential(layer.double(), nn.Flatten())), nn.CrossEntropyLoss()
    torch.manual_seed(0)
    x = torch.randn(5, 4, dtype=torch.float64)
    x = x if isinstance(layer, nn.Linear) else x.unsqueeze(-1)
    y = torch.randint(0, 3, (5,))
    p = model[0].weight

    def step(scale):
        model.zero_grad()
        with backpack(BatchGrad()):
            lossfunc(model(x * scale), y).backward()
        ref = per_sample_grads(model, lossfunc, x * scale, y)["0.weight"]
        torch.testing.assert_close(p.grad_batch, ref)

    step(1.0)
    ptr = p.grad_batch.data_ptr()
    step(2.0)
    assert p.grad_batch.data_ptr() == ptr  # the unreferenced buffer was reused
    held, view = p.grad_batch, p.grad_batch[0]
    before, before_view = held.clone(), view.clone()
    step(3.0)
    assert p.grad_batch is not held
    torch.testing.assert_close(held, before)  # a user's reference and view keep their values
    torch.testing.assert_close(view, before_view)


def test_user_registered_rule_like_the_readme():
    """A user's layer: one Rule subclass registered with backpack.register serves every extension."""
    import backpack as bp
    from backpack.extensions import DiagGGNExact

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.tensor([2.0], dtype=torch.float64))

        def forward(self, x):
            return x * self.weight

    @bp.register(Scale)
    class ScaleRule(bp.Rule):
        needs_output = False

        def jac_t_mat_prod(self, module, io, mat):
            return mat * module.weight

        def param_jac_t_mat_prod(self, module, io, mat, name, sum_batch=True):
            out = (mat * io.input0).flatten(2).sum(2, keepdim=True)
            return out.sum(1) if sum_batch else out

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), Scale(), nn.Tanh(), nn.Linear(3, 3)).double()
    lossfunc = nn.CrossEntropyLoss()
    x, y = _data()
    ref = per_sample_grads(model, lossfunc, x, y)
    extend(model)
    extend(lossfunc)
    with backpack(BatchGrad(), DiagGGNExact()):
        lossfunc(model(x), y).backward()
    from tests.oracles import ggn_diag

    ggn = ggn_diag(model, lossfunc, x, y)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad_batch, ref[name])
        torch.testing.assert_close(p.diag_ggn_exact, ggn[name])

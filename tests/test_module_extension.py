"""BackPACK's per-extension API: ``ext.set_module_extension(cls, ModuleExtension)``."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules.loss import _Loss

from backpack import backpack, extend
from backpack.engine.call import HANDLED_TYPES
from backpack.extensions import (
    BackpropExtension,
    BatchGrad,
    DiagGGNExact,
    DiagHessian,
    SqrtGGNExact,
    SumGradSquared,
)
from backpack.extensions.firstorder.base import (
    FirstOrderBackpropExtension,
    FirstOrderModuleExtension,
)
from backpack.extensions.module_extension import ModuleExtension
from tests.oracles import ggn_diag, hessian_diag, per_sample_grads


@pytest.fixture(autouse=True)
def _restore_handled_types():
    before = set(HANDLED_TYPES)
    yield
    HANDLED_TYPES.intersection_update(before)  # handlers of this test no longer keep outputs


class Scale(nn.Module):
    """``x * weight``, a scalar weight; no rule."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([1.5], dtype=torch.float64))

    def forward(self, x):
        return x * self.weight


class ScaleBatchGrad(FirstOrderModuleExtension):
    def __init__(self):
        super().__init__(params=["weight"])

    def weight(self, ext, module, g_inp, g_out, bp):
        assert g_inp is None and module.output.shape == g_out[0].shape
        return (g_out[0] * module.input0).flatten(1).sum(1, keepdim=True)


class ScaleCurvature(ModuleExtension):
    """Diagonal of ``sum_v (J^T S_v)^2`` (GGN or, with signed factors, Hessian) for ``weight``."""

    def __init__(self):
        super().__init__(params=["weight"])

    def backpropagate(self, ext, module, g_inp, g_out, bp):
        return bp * module.weight

    def weight(self, ext, module, g_inp, g_out, bp):
        return (bp * module.input0).flatten(2).sum(2).square().sum((0, 1)).unsqueeze(0)


class ScaleSqrtGGN(ScaleCurvature):
    def weight(self, ext, module, g_inp, g_out, bp):
        return (bp * module.input0).flatten(2).sum(2, keepdim=True)  # [v, n, 1]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), Scale(), nn.Tanh(), nn.Linear(3, 3)).double()


def _data(n: int = 5):
    torch.manual_seed(1)
    return torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,))


def _backward(model, lossfunc, exts, x, y):
    extend(model)
    extend(lossfunc)
    with backpack(*exts):
        lossfunc(model(x), y).backward()


def test_construction_and_mapping_errors():
    class Missing(ModuleExtension):
        def __init__(self):
            super().__init__(params=["weight"])

    with pytest.raises(NotImplementedError, match="weight"):
        Missing()
    ext, handler = BatchGrad(), ScaleBatchGrad()
    ext.set_module_extension(Scale, handler)
    with pytest.raises(ValueError, match="maps to .* Use overwrite = True to force replacement"):
        ext.set_module_extension(Scale, ScaleBatchGrad())
    other = ScaleBatchGrad()
    ext.set_module_extension(Scale, other, overwrite=True)
    assert ext.module_extension_for(Scale()) is other
    assert BatchGrad().module_extension_for(Scale()) is None  # per instance
    assert ext.module_extension_for(type("Sub", (Scale,), {})()) is None  # exact class only
    base = BackpropExtension("my_field", module_exts={Scale: handler})
    assert base.module_extension_for(Scale()) is handler


def test_first_order_handler_matches_autograd():
    model, lossfunc = _model(), nn.CrossEntropyLoss()
    x, y = _data()
    ref = per_sample_grads(model, lossfunc, x, y)
    ext = BatchGrad()
    ext.set_module_extension(Scale, ScaleBatchGrad())
    _backward(model, lossfunc, [ext, SumGradSquared()], x, y)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad_batch, ref[name])
        if name != "1.weight":  # without a handler: the rules as usual
            torch.testing.assert_close(p.sum_grad_squared, ref[name].square().sum(0))
    assert not {"input0", "output"} & set(model[1].__dict__)


def test_handler_wins_over_rule_and_sees_output():
    seen = []

    class LinearCount(FirstOrderModuleExtension):
        def __init__(self):
            super().__init__(params=["bias"])

        def bias(self, ext, module, g_inp, g_out, bp):
            seen.append(module.output.shape)  # kept although Linear's rule needs no output
            return torch.zeros(1)

    model, lossfunc = _model(), nn.CrossEntropyLoss()
    x, y = _data()
    ext = BatchGrad()
    ext.set_module_extension(nn.Linear, LinearCount())
    ext.set_module_extension(Scale, ScaleBatchGrad())
    _backward(model, lossfunc, [ext], x, y)
    assert seen == [(5, 3), (5, 3)]
    assert torch.equal(model[0].bias.grad_batch, torch.zeros(1))
    assert not hasattr(model[0].weight, "grad_batch")  # not in the handler's params


@pytest.mark.parametrize("ext_cls", [DiagGGNExact, DiagHessian])
def test_second_order_handler(ext_cls):
    model, lossfunc = _model(), nn.CrossEntropyLoss()
    x, y = _data()
    oracle = ggn_diag if ext_cls is DiagGGNExact else hessian_diag
    ref = oracle(model, lossfunc, x, y)
    ext = ext_cls()
    ext.set_module_extension(Scale, ScaleCurvature())  # Tanh's residual: signed factors pass
    _backward(model, lossfunc, [ext], x, y)
    for name, p in model.named_parameters():
        torch.testing.assert_close(getattr(p, ext.savefield), ref[name])


class TwoLosses(nn.Module):
    def __init__(self, target):
        super().__init__()
        self.ce, self.mse, self.target = nn.CrossEntropyLoss(), nn.MSELoss(), target

    def forward(self, out, y):
        return self.ce(out, y) + self.mse(out, self.target)


class LinearGGN(ModuleExtension):
    """GGN diagonal of nn.Linear's parameters: ``sum_{v,n} (S_vn x_n^T)^2``."""

    def __init__(self):
        super().__init__(params=["weight", "bias"])

    def backpropagate(self, ext, module, g_inp, g_out, bp):
        return bp @ module.weight

    def weight(self, ext, module, g_inp, g_out, bp):
        return torch.einsum("vno,ni->oi", bp.square(), module.input0.square())

    def bias(self, ext, module, g_inp, g_out, bp):
        return bp.square().sum((0, 1))


def test_two_losses_and_a_shared_stream():
    """Factors of two losses reach the handlers concatenated. At nn.Linear, SqrtGGNExact (same
    stream, no handler) is served by the rule, which passes the stream on."""
    model, x, y = _model(), *_data()
    loss = TwoLosses(torch.randn(5, 3, dtype=torch.float64))
    ref = ggn_diag(model, loss, x, y)
    diag = DiagGGNExact()
    diag.set_module_extension(Scale, ScaleCurvature())
    diag.set_module_extension(nn.Linear, LinearGGN())
    sqrt = SqrtGGNExact()
    sqrt.set_module_extension(Scale, ScaleSqrtGGN())
    _backward(model, loss, [diag, sqrt], x, y)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.diag_ggn_exact, ref[name])
        torch.testing.assert_close(p.sqrt_ggn_exact.square().sum((0, 1)), ref[name])


class HalfSquares(_Loss):
    """``0.5 * sum (x - y)^2``; no rule."""

    def forward(self, x, y):
        return 0.5 * (x - y).square().sum()


class HalfSquaresGGN(ModuleExtension):
    def backpropagate(self, ext, module, g_inp, g_out, bp):
        assert bp is None  # the root: the square root of the loss Hessian (identity)
        n, c = module.input0.shape
        eye = torch.eye(c, dtype=module.input0.dtype)
        return eye[:, None, :].expand(c, n, c)


def test_loss_handler_starts_the_stream():
    model, (x, _) = _model(), _data()
    y = torch.randn(5, 3, dtype=torch.float64)
    lossfunc = HalfSquares()
    ref = ggn_diag(model, lossfunc, x, y)
    ext = DiagGGNExact()
    ext.set_module_extension(Scale, ScaleCurvature())
    ext.set_module_extension(HalfSquares, HalfSquaresGGN())
    _backward(model, lossfunc, [ext], x, y)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.diag_ggn_exact, ref[name])


def test_errors_name_the_remedy_and_leave_no_attributes():
    model, lossfunc = _model(), nn.CrossEntropyLoss()
    x, y = _data()

    class Strict(ScaleBatchGrad):
        def check_hyperparameters_module_extension(self, ext, module, g_inp, g_out):
            raise ValueError("unsupported configuration")

    ext = BatchGrad()
    ext.set_module_extension(Scale, Strict())
    with pytest.raises(ValueError, match="unsupported"):
        _backward(model, lossfunc, [ext], x, y)
    assert not {"input0", "output"} & set(model[1].__dict__)

    ext = DiagGGNExact()
    ext.set_module_extension(Scale, ScaleBatchGrad())  # a first-order handler cannot pass S on
    with pytest.raises(NotImplementedError, match="ScaleBatchGrad .* returned None"):
        _backward(model, lossfunc, [ext], x, y)


def test_user_defined_first_order_extension():
    class GradSquared(FirstOrderModuleExtension):
        def __init__(self):
            super().__init__(params=["weight"])

        def weight(self, ext, module, g_inp, g_out, bp):
            return (g_out[0] * module.input0).sum().square().unsqueeze(0)

    model, lossfunc = _model(), nn.CrossEntropyLoss()
    x, y = _data()
    ext = FirstOrderBackpropExtension("grad_sq", {Scale: GradSquared()}, fail_mode="SILENT")
    _backward(model, lossfunc, [ext], x, y)
    torch.testing.assert_close(model[1].weight.grad_sq, model[1].weight.grad.square())
    assert not hasattr(model[0].weight, "grad_sq")
    with pytest.raises(AssertionError):
        FirstOrderBackpropExtension("grad_sq", fail_mode="LOUD")
    ext = FirstOrderBackpropExtension("grad_sq", {Scale: GradSquared()}, fail_mode="ERROR")
    with pytest.raises(NotImplementedError, match="no module extension for Linear"):
        _backward(model, lossfunc, [ext], x, y)


class RecordingCurvature(ScaleCurvature):
    """Keeps the factors it is handed."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def weight(self, ext, module, g_inp, g_out, bp):
        self.seen.append(bp)
        return super().weight(ext, module, g_inp, g_out, bp)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_handlers_get_the_columns_of_1_7(reduction):
    """Cross-entropy's square root reaches handlers as BackPACK 1.7's ``[C, N, *out]``,
    ``diag(sqrt p) - p sqrt(p)^T`` (times ``1/sqrt(N)`` for ``mean``), not the lean C - 1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3), Scale()).double()
    lossfunc = nn.CrossEntropyLoss(reduction=reduction)
    x, y = _data()
    ref = ggn_diag(model, lossfunc, x, y)
    ext, handler = DiagGGNExact(), RecordingCurvature()
    ext.set_module_extension(Scale, handler)
    _backward(model, lossfunc, [ext], x, y)
    p = model(x).softmax(1).detach()
    sqrt_p = p.sqrt()
    root = torch.diag_embed(sqrt_p) - p.unsqueeze(2) * sqrt_p.unsqueeze(1)  # [n, c, c']
    root = root.permute(2, 0, 1) / (len(x) ** 0.5 if reduction == "mean" else 1.0)
    (bp,) = handler.seen
    torch.testing.assert_close(bp, root)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.diag_ggn_exact, ref[name])

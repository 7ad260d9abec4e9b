"""``extend(model, use_converter=True)`` on ResNet blocks, an LSTM classifier and a U-Net."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backpack import backpack, extend
from backpack.custom_module.graph_utils import convert_module_to_backpack
from backpack.extensions import (
    GGNMP,
    HMP,
    KFAC,
    KFLR,
    KFRA,
    PCHMP,
    BatchDiagGGNExact,
    BatchDiagHessian,
    BatchGrad,
    BatchL2Grad,
    DiagGGNExact,
    DiagGGNMC,
    DiagHessian,
    SqrtGGNExact,
    SumGradSquared,
    Variance,
)
from tests.models import MODELS, make
from tests.oracles import (
    assert_first_order_and_diagonals,
    assert_kfra_exact_at_batch_one,
    ggn_block,
    hessian_block,
)


def _run(name: str, exts: list, n: int = 3):
    model, x = make(name)
    lossfunc, y, x = nn.CrossEntropyLoss(), torch.tensor([0, 2, 1])[:n], x[:n]
    converted = extend(model, use_converter=True)
    with backpack(*exts):
        extend(lossfunc)(converted(x), y).backward()
    return model, converted, lossfunc, x, y


@pytest.mark.parametrize("name", MODELS)
def test_same_outputs_names_and_user_model_untouched(name):
    model, x = make(name)
    flags = [getattr(m, "inplace", None) for m in model.modules()]
    converted = extend(model, use_converter=True)
    torch.testing.assert_close(converted(x), model(x))
    assert dict(converted.named_parameters()).keys() == dict(model.named_parameters()).keys()
    assert all(p is dict(model.named_parameters())[k] for k, p in converted.named_parameters())
    assert [getattr(m, "inplace", None) for m in model.modules()] == flags
    assert not any(getattr(m, "_backpack_extend", False) for m in model.modules())


@pytest.mark.parametrize("name", MODELS)
def test_first_order_and_diagonals_match_oracles(name):
    exts = [BatchGrad(), BatchL2Grad(), SumGradSquared(), Variance(), DiagGGNExact()]
    exts += [BatchDiagGGNExact(), DiagGGNMC(), DiagHessian(), BatchDiagHessian()]
    model, converted, lossfunc, x, y = _run(name, exts)
    params = dict(converted.named_parameters())
    assert_first_order_and_diagonals(params, model, lossfunc, x, y)


@pytest.mark.parametrize("name", MODELS)
def test_sqrt_ggn_and_products_match_dense_blocks(name):
    """SqrtGGNExact, GGNMP, HMP against the dense blocks; PCHMP where its block has a closed
    form: the GGN on the piecewise-linear ResNets, ``GGN + |H - GGN|_+`` (eigenvalues clipped)
    for the LSTM's and the head's parameters (only linear layers after them)."""
    exts = [SqrtGGNExact(), GGNMP(), HMP(), PCHMP()]
    model, converted, lossfunc, x, y = _run(name, exts)
    torch.manual_seed(1)
    for key, p in converted.named_parameters():
        ggn = ggn_block(model, lossfunc, x, y, key)
        flat = p.sqrt_ggn_exact.reshape(-1, p.numel())
        torch.testing.assert_close(flat.T @ flat, ggn)
        mat = torch.randn(2, *p.shape, dtype=p.dtype)
        torch.testing.assert_close(p.ggnmp(mat).flatten(1), (ggn @ mat.flatten(1).T).T)
        hess = hessian_block(model, lossfunc, x, y, key)
        torch.testing.assert_close(p.hmp(mat).flatten(1), (hess @ mat.flatten(1).T).T)
        assert p.pchmp(mat).shape == mat.shape
        if name.startswith("resnet") or key.startswith(("lstm.", "fc.")):
            evals, evecs = torch.linalg.eigh(hess - ggn)
            pch = ggn + (evecs * evals.clamp(min=0)) @ evecs.T
            torch.testing.assert_close(p.pchmp(mat).flatten(1), mat.flatten(1) @ pch)


@pytest.mark.parametrize("name", MODELS)
def test_kronecker_factors_on_every_parameter(name):
    """KFAC and KFLR: square factors whose sizes multiply to the parameter's; KFLR's single
    factors (biases, BatchNorm) are exact GGN blocks."""
    model, converted, lossfunc, x, y = _run(name, [KFAC(), KFLR()])
    for key, p in converted.named_parameters():
        for factors in (p.kfac, p.kflr):
            assert all(f.shape[0] == f.shape[1] for f in factors)
            assert torch.Size([f.shape[0] for f in factors]).numel() == p.numel()
        if len(p.kflr) == 1:
            torch.testing.assert_close(p.kflr[0], ggn_block(model, lossfunc, x, y, key))


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("name", MODELS)
def test_kfra_through_branches(name, n):
    """Residual sums and skip concatenations: KFRA's cross blocks between the paths make it
    equal KFLR at batch size one; symmetric PSD factors at batch size three."""
    _, converted, *_ = _run(name, [KFLR(), KFRA()], n)
    assert_kfra_exact_at_batch_one(dict(converted.named_parameters()), n)


class _Functional(nn.Module):
    """Subtraction, division, permute/transpose, F.pad, a reused parameter-free module."""

    def __init__(self):
        super().__init__()
        self.lin, self.act = nn.Linear(4, 4), nn.Sigmoid()

    def forward(self, x):
        h = self.act(self.lin(x)) - x / 2
        h = torch.nn.functional.pad(h.unsqueeze(1).transpose(1, 2), (1, 1)).permute(0, 2, 1)
        return self.act(h).flatten(1)


def test_functional_ops_and_unmapped_warning():
    torch.manual_seed(0)
    model, x = _Functional().double(), torch.randn(3, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match="unsqueeze"):
        converted = convert_module_to_backpack(model)
    torch.testing.assert_close(converted(x), model(x))
    names = [type(m).__name__ for m in converted.modules()]
    for expected in ("SumModule", "ScaleModule", "Permute", "Pad"):
        assert expected in names
    assert names.count("Sigmoid") == 2  # the reused parameter-free module got a copy

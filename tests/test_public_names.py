"""Names BackPACK 1.7 users import: ``Parallel``/``_Branch``, ``convert_module_to_backpack``,
``backpack.utils.examples``, ``backpack.utils.subsampling.subsample``, ``HBP`` with curvatures
other than the GGN, the converter's ``Tensor.multiply``."""

from __future__ import annotations

import gzip
from collections import OrderedDict

import pytest
import torch
from torch import nn

import backpack
from backpack import backpack as bp_context
from backpack import extend
from backpack.custom_module.branching import Parallel, SumModule, _Branch
from backpack.custom_module.scale_module import ScaleModule
from backpack.extensions import (
    HBP,
    KFLR,
    PCHMP,
    BatchDiagGGNExact,
    BatchDiagHessian,
    BatchGrad,
    BatchL2Grad,
    DiagGGNExact,
    DiagGGNMC,
    DiagHessian,
    SumGradSquared,
    Variance,
)
from backpack.extensions.curvature import Curvature
from backpack.utils import examples
from backpack.utils.kroneckers import kfacs_to_mat
from backpack.utils.subsampling import subsample
from tests.oracles import assert_first_order_and_diagonals, ggn_diag, hessian_block


def _data(n: int = 3):
    torch.manual_seed(1)
    return torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,))


def _parallel(ordered: bool) -> nn.Module:
    torch.manual_seed(0)
    a, b = nn.Sequential(nn.Linear(4, 5), nn.Tanh()), nn.Linear(4, 5)
    branches = (OrderedDict(a=a, b=b),) if ordered else (a, b)
    return nn.Sequential(Parallel(*branches), nn.ReLU(), nn.Linear(5, 3)).double()


@pytest.mark.parametrize("ordered", [False, True], ids=["modules", "ordered-dict"])
def test_parallel_sums_branches_and_extensions_pass_it(ordered):
    model = _parallel(ordered)
    x, y = _data()
    par = model[0]
    assert isinstance(par[0], _Branch) and isinstance(par[1], SumModule)
    a, b = par[0].children()
    torch.testing.assert_close(par(x), a(x) + b(x))
    extend(model)
    assert not par._forward_hooks and not par[0]._forward_hooks  # containers: not hooked
    lossfunc = extend(nn.CrossEntropyLoss())
    exts = (BatchGrad(), BatchL2Grad(), SumGradSquared(), Variance(), DiagGGNExact(),
            BatchDiagGGNExact(), DiagHessian(), BatchDiagHessian(), DiagGGNMC())  # fmt: skip
    with bp_context(*exts):
        lossfunc(model(x), y).backward()
    assert_first_order_and_diagonals(dict(model.named_parameters()), model, lossfunc, x, y)


def test_parallel_merge_module():
    torch.manual_seed(0)
    par = Parallel(nn.Linear(2, 3), nn.Linear(2, 3), merge_module=_Stack())
    x = torch.randn(4, 2)
    assert par(x).shape == (2, 4, 3)


class _Stack(nn.Module):
    def forward(self, *tensors):
        return torch.stack(tensors)


class _Multiply(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return torch.multiply(self.lin(x).multiply(2.0), 0.5) + self.lin(x).divide(4.0)


def test_converter_is_top_level_and_maps_multiply():
    assert (
        backpack.convert_module_to_backpack
        is backpack.custom_module.graph_utils.convert_module_to_backpack
    )
    torch.manual_seed(0)
    model, (x, y) = _Multiply().double(), _data()
    converted = backpack.convert_module_to_backpack(model)
    scales = [m.weight for m in converted.modules() if isinstance(m, ScaleModule)]
    assert sorted(scales) == [0.25, 0.5, 2.0]
    torch.testing.assert_close(converted(x), model(x))
    lossfunc = extend(nn.CrossEntropyLoss())
    with bp_context(DiagGGNExact()):
        lossfunc(extend(converted)(x), y).backward()
    ref = ggn_diag(model, lossfunc, x, y)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.diag_ggn_exact, ref[name])


@pytest.mark.parametrize("dim", [0, 1])
def test_subsample(dim):
    t = torch.arange(12.0).reshape(3, 4)
    assert subsample(t, dim) is t
    torch.testing.assert_close(
        subsample(t, dim, [2, 0, 2]), t.index_select(dim, torch.tensor([2, 0, 2]))
    )


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)
    ).double()


def _hbp(curv: Curvature, strategy: str) -> HBP:
    loss, backprop = {"sqrt": ("exact", "sqrt"), "average": ("sum", "average")}[strategy]
    return HBP(curv, loss, backprop, "E[J^T E(H) J]", savefield=f"hbp_{curv.name}")


@pytest.mark.parametrize("strategy", ["sqrt", "average"])
@pytest.mark.parametrize("n", [1, 3])
def test_hbp_hessian(strategy, n):
    """``G`` is the Hessian w.r.t. each layer's output: the bias blocks are exact (SQRT; the
    batch-averaged recursion at batch size one), ``G ⊗ A`` is the weight block at batch size
    one; the positive-curvature variants match PCHMP's bias blocks."""
    model, (x, y) = _mlp(), _data(n)
    lossfunc = nn.CrossEntropyLoss()
    exts = [_hbp(c, strategy) for c in Curvature if c != Curvature.GGN]
    pch = {"clip": PCHMP(savefield="pch_clip"), "abs": PCHMP(savefield="pch_abs", modify="abs")}
    with bp_context(*exts, *pch.values(), KFLR()):
        extend(lossfunc)(extend(model)(x), y).backward()
    exact = n == 1 or strategy == "sqrt"
    for i in (0, 2, 4):
        lin = model[i]
        hess = lin.bias.hbp_HESSIAN
        if exact:
            torch.testing.assert_close(hess[0], hessian_block(model, lossfunc, x, y, f"{i}.bias"))
        if n == 1:
            ref = hessian_block(model, lossfunc, x, y, f"{i}.weight")
            torch.testing.assert_close(kfacs_to_mat(lin.weight.hbp_HESSIAN), ref)
        eye = torch.eye(lin.bias.numel(), dtype=torch.float64)
        for modify, curv in (("clip", Curvature.PCH_CLIP), ("abs", Curvature.PCH_ABS)):
            if exact:
                block = getattr(lin.bias, f"pch_{modify}")(eye)
                torch.testing.assert_close(getattr(lin.bias, f"hbp_{curv.name}")[0], block)
    # GGN: the presets' factors
    torch.testing.assert_close(model[4].weight.kflr[1], model[4].weight.hbp_HESSIAN[1])


def test_hbp_options_errors():
    with pytest.raises(NotImplementedError, match="PCH_CLIP"):
        HBP(Curvature.HESSIAN, "exact", "average", "E[J^T E(H) J]")
    with pytest.raises(NotImplementedError, match="supported combinations"):
        HBP(Curvature.GGN, "exact", "sqrt", "E(J^T) E(H) E(J)")


def _fake_mnist(root, n: int = 5, gz: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), dtype=torch.uint8)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for stem, t in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)):
        header = bytes([0, 0, 8, t.dim()]) + b"".join(s.to_bytes(4, "big") for s in t.shape)
        data = header + bytes(t.flatten().tolist())
        if gz:
            with gzip.open(raw / f"{stem}.gz", "wb") as f:
                f.write(data)
        else:
            (raw / stem).write_bytes(data)
    return images, labels


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_from_the_local_cache(tmp_path, monkeypatch, gz):
    monkeypatch.setenv("BACKPACK_DATA", str(tmp_path))
    images, labels = _fake_mnist(tmp_path, gz=gz)
    dataset = examples.load_mnist_dataset()
    X, y = dataset.tensors
    torch.testing.assert_close(X, (images.unsqueeze(1).float() / 255 - 0.1307) / 0.3081)
    assert torch.equal(y, labels.long())
    Xb, yb = examples.load_one_batch_mnist(batch_size=3, shuffle=False)
    assert Xb.shape == (3, 1, 28, 28) and torch.equal(yb, labels[:3].long())
    assert examples.load_one_batch_mnist(batch_size=2, flat=True)[0].shape == (2, 784)
    assert len(examples.get_mnist_dataloader(batch_size=2)) == 3


def test_mnist_absent_raises_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("BACKPACK_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="never downloads.*BACKPACK_DATA"):
        examples.load_one_batch_mnist()


def test_autograd_diag_ggn_exact():
    model, (x, y) = _mlp(), _data()
    lossfunc = nn.CrossEntropyLoss()
    ref = torch.cat([d.flatten() for d in ggn_diag(model, lossfunc, x, y).values()])
    torch.testing.assert_close(examples.autograd_diag_ggn_exact(x, y, model, lossfunc), ref)
    idx = [0, 7, len(ref) - 1]
    torch.testing.assert_close(
        examples.autograd_diag_ggn_exact(x, y, model, lossfunc, idx), ref[idx]
    )

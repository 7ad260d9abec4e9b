"""``backward(create_graph=True)`` inside ``backpack(...)``: first-order quantities are part of
the graph, so their derivatives w.r.t. the parameters and the input (e.g. of the variance, for
a gradient-noise penalty) equal those of per-sample gradients that autograd differentiates;
second-order extensions, and rules that recompute their layer detached, raise.

Tests that raise use ``autograd.grad``: ``backward(create_graph=True)`` makes each ``.grad``
it accumulated before the error reference the graph, a cycle through C++ that leaks it (the
``UserWarning`` torch gives, unrelated to backpack). An error inside a create_graph backward
still keeps that graph alive (also before this feature; torch holds it), so the leak test counts
what its own steps leave."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from backpack import backpack, extend, memory_cleanup
from backpack.extensions import (
    KFAC,
    BatchGrad,
    BatchL2Grad,
    DiagGGNExact,
    SumGradSquared,
    Variance,
)
from backpack.utils import workspace
from tests.cases import LAYER_CASES, Problem
from tests.oracles import FIRST_ORDER, live_records, per_sample_grads_graph
from tests.test_engine import Unknown, _mlp

pytestmark = pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")

# EmbeddingBag is left out: torch has no double backward of embedding_bag for the oracle
CASES = [
    "Linear",
    "Linear-extradims",
    "Conv1d-stride-pad-dil",
    "Conv2d-groups",
    "Conv2d-circular",
    "Conv2d-1x1",
    "ConvTranspose1d-groups-dil-nobias",
    "ConvTranspose2d-stride-pad-outpad",
    "BatchNorm2d",
    "Embedding-padding_idx",
    "Linear-LayerNorm-Tanh",
    "Conv2d-GroupNorm",
    "Linear-GELU-Linear",
]
PROBLEMS = [
    Problem(c, loss, red, 3)
    for c in LAYER_CASES
    if c.name in CASES
    for loss, red in (("ce", "mean"), ("mse", "sum"))
]
EXTENSIONS = {
    "grad_batch": BatchGrad,
    "batch_l2": BatchL2Grad,
    "sum_grad_squared": SumGradSquared,
    "variance": Variance,
}


def _check_derivatives(model, lossfunc, x, y, fields, subsampling=None) -> None:
    """d(sum_q <w_q, q>)/d(params, x) of the extensions' quantities ``q`` computed under
    ``backward(create_graph=True)`` equals that of the oracle's quantities."""
    extend(model), extend(lossfunc)
    if x.is_floating_point():
        x.requires_grad_(True)
    named = {k: p for k, p in model.named_parameters() if p.requires_grad}
    wrt = [*named.values(), *[x] * x.requires_grad]
    with backpack(*(EXTENSIONS[f](subsampling=subsampling) for f in fields)):
        lossfunc(model(x), y).backward(create_graph=True)
    got = {k: {f: getattr(p, f) for f in fields} for k, p in named.items()}
    ref = per_sample_grads_graph(model, lossfunc, x, y)
    want = {k: {f: FIRST_ORDER[f](g if subsampling is None else g[subsampling]) for f in fields}
            for k, g in ref.items()}  # fmt: skip
    torch.manual_seed(1)
    weights = {k: {f: torch.randn_like(q) for f, q in qs.items()} for k, qs in want.items()}

    def derivatives(quantities: dict) -> tuple:
        scalar = sum(
            (quantities[k][f] * w).sum() for k, ws in weights.items() for f, w in ws.items()
        )
        return torch.autograd.grad(scalar, wrt, allow_unused=True)

    # backward(create_graph=True) ties each .grad to its parameter in a cycle torch cannot
    # collect (its own warning): break it, or the graph and the records in it stay alive
    for p in named.values():
        p.grad = None
    for k in named:
        for f in fields:
            torch.testing.assert_close(got[k][f], want[k][f].detach())
    for a, b, name in zip(derivatives(got), derivatives(want), [*named, "x"]):
        if b is None:
            assert a is None or not a.any(), name
        else:
            torch.testing.assert_close(a, b, msg=lambda m, name=name: f"d/d{name}: {m}")


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.id)
@pytest.mark.parametrize("fields", [list(FIRST_ORDER), ["variance"], ["batch_l2"]], ids=len)
def test_first_order_quantities_differentiable(problem, fields, monkeypatch):
    """All four extensions together (shared cache) and the ones with their own contractions
    alone, against per-sample gradients differentiated by autograd; kept memory asked for
    every tensor (it must stay out of the graph)."""
    monkeypatch.setattr(workspace, "MIN_BYTES", 0)
    _check_derivatives(*problem.build(), fields)
    _check_derivatives(*problem.build(), fields)  # again: buffers of the last pass exist


def test_subsampling_and_reuse_differentiable():
    """A module called twice (summed pieces) and a subsample, deep in a curved network."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), lin, nn.Sigmoid(), lin, nn.Linear(4, 2))
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    _check_derivatives(model.double(), nn.CrossEntropyLoss(), x.double(), y, list(FIRST_ORDER))
    _check_derivatives(
        _mlp(), nn.CrossEntropyLoss(), *_data(), ["grad_batch", "variance"], subsampling=[2, 0]
    )


def _data():
    torch.manual_seed(1)
    return torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 3, (3,))


@pytest.mark.parametrize("ext", [DiagGGNExact, KFAC])
def test_second_order_raises(ext):
    model, lossfunc = extend(_mlp()), extend(nn.CrossEntropyLoss())
    with pytest.raises(NotImplementedError, match=f"{ext.__name__}: backward\\(create_graph"):
        with backpack(ext(), BatchGrad()):
            loss = lossfunc(model(_data()[0]), _data()[1])
            torch.autograd.grad(loss, list(model.parameters()), create_graph=True)


@pytest.mark.parametrize(
    "layer",
    [
        lambda: nn.LSTM(3, 3, batch_first=True),
        lambda: nn.MultiheadAttention(3, 1, batch_first=True),
        Unknown,
    ],
    ids=["LSTM", "MHA", "automatic"],
)
def test_detached_rules_raise(layer):
    class First(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer().double()

        def forward(self, x):
            out = (
                self.layer(x, x, x)
                if isinstance(self.layer, nn.MultiheadAttention)
                else self.layer(x)
            )
            return out[0] if isinstance(out, tuple) else out

    model = extend(nn.Sequential(First(), nn.Flatten(), nn.LazyLinear(3)).double())
    x, y = torch.randn(2, 5, 3, dtype=torch.float64), torch.randint(0, 3, (2,))
    lossfunc = extend(nn.CrossEntropyLoss())
    loss = lossfunc(model(x), y)
    with pytest.raises(NotImplementedError, match="computes them from detached tensors"):
        with backpack(Variance()):
            torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    # a backward pass that raised under create_graph leaves its graph alive (a cycle through
    # autograd's C++ nodes): memory_cleanup frees the records in it
    for m in (*model.modules(), lossfunc):
        memory_cleanup(m)
    assert not live_records()


def test_no_leak_under_create_graph():
    """Records keep the graph-attached inputs: freed after each pass, no growth over steps."""
    model, lossfunc = extend(_mlp()), extend(nn.CrossEntropyLoss())
    x, y = _data()
    params = list(model.parameters())

    def step():
        with backpack(Variance(), BatchL2Grad()):
            loss = lossfunc(model(x), y)
            grads = torch.autograd.grad(loss, params, create_graph=True)
        penalty = sum(p.variance.sum() + p.batch_l2.sum() for p in params) + grads[0].sum()
        penalty.backward()
        for p in params:
            p.grad = p.variance = p.batch_l2 = None
        model(x)  # an undifferentiated forward

    for _ in range(5):
        step()
    gc.collect()
    before = sum(isinstance(o, torch.Tensor) for o in gc.get_objects()), len(live_records())
    for _ in range(50):
        step()
    gc.collect()
    after = sum(isinstance(o, torch.Tensor) for o in gc.get_objects()), len(live_records())
    assert after <= before

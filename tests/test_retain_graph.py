"""DiagGGNExact of an MSE autoencoder (Conv2d encoder, ConvTranspose2d decoder) in chunks over
output slices (``Slicing``, ``retain_graph=True``), as the original's retain-graph example:
the chunks add up to the exact GGN diagonal; a graph retained from an earlier forward pass
does not send the new calls down the summing path of modules called several times."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

import backpack.engine.driver as hooks
from backpack import backpack, extend
from backpack.custom_module.slicing import Slicing
from backpack.extensions import BatchGrad, DiagGGNExact
from tests.oracles import ggn_diag, live_records


def _autoencoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.Sigmoid(),
        nn.ConvTranspose2d(2, 2, 3, stride=2, padding=1, output_padding=1), nn.Sigmoid(),
        nn.ConvTranspose2d(2, 1, 3, padding=1), nn.Flatten(),
    ).double()  # fmt: skip


def _chunked(model: nn.Module, lossfunc: nn.Module, x: torch.Tensor, chunk: int) -> dict:
    """The GGN diagonal as the sum over output slices, one retained backward pass each."""
    out, y = model(x), x.flatten(1)
    total = {k: 0 for k, _ in model.named_parameters()}
    for start in range(0, out.shape[1], chunk):
        part = extend(Slicing((slice(None), slice(start, start + chunk))))
        with backpack(DiagGGNExact(), retain_graph=True):
            lossfunc(part(out), y[:, start : start + chunk]).backward(retain_graph=True)
        for k, p in model.named_parameters():
            total[k] = total[k] + p.diag_ggn_exact
    return total


@pytest.mark.parametrize("earlier_graph", [False, True], ids=["alone", "after-retained-graph"])
def test_chunked_ggn_diagonal_of_autoencoder(earlier_graph, monkeypatch):
    model, lossfunc = extend(_autoencoder()), extend(nn.MSELoss(reduction="sum"))
    torch.manual_seed(1)
    x = torch.rand(3, 1, 6, 6, dtype=torch.float64)
    if earlier_graph:  # the whole diagonal first, its graph kept alive and retained
        loss = lossfunc(model(x), x.flatten(1))
        with backpack(DiagGGNExact(), retain_graph=True):
            loss.backward(retain_graph=True)
    summed = []
    monkeypatch.setattr(hooks, "_collect", lambda *a: summed.append(a))
    total = _chunked(model, lossfunc, x, chunk=10)
    assert not summed  # every call on the direct path
    want = ggn_diag(model, nn.MSELoss(reduction="sum"), x, x.flatten(1))
    for k, v in total.items():
        torch.testing.assert_close(v, want[k])


def test_reused_module_in_retained_graph_still_sums():
    """A module called twice in one graph, backpropagated twice with retain_graph: both passes
    sum both calls (the second one knows both nodes), as a single pass does."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 3).double()
    model = extend(nn.Sequential(lin, nn.Tanh(), lin))
    lossfunc = extend(nn.MSELoss(reduction="sum"))
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    with backpack(DiagGGNExact(), BatchGrad()):
        lossfunc(model(x), y).backward()
    want = lin.weight.diag_ggn_exact
    loss = lossfunc(model(x), y)
    for _ in range(2):
        lin.zero_grad()
        with backpack(DiagGGNExact(), BatchGrad(), retain_graph=True):
            loss.backward(retain_graph=True)
        torch.testing.assert_close(lin.weight.diag_ggn_exact, want)
        torch.testing.assert_close(lin.weight.grad_batch.sum(0), lin.weight.grad)


def test_dropped_retained_graph_freed_by_next_forward():
    """Records of a retained graph hold their node (a cycle through C++); once the user drops
    the graph, the next forward frees all of them, not one node per collection."""
    model, lossfunc = extend(_autoencoder()), extend(nn.MSELoss())
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    for _ in range(3):
        with backpack(DiagGGNExact(), retain_graph=True):
            lossfunc(model(x), x.flatten(1)).backward(retain_graph=True)
    out = model(x)
    gc.collect()
    mine = [r for r in live_records() if any(r.module is m for m in model)]
    assert len(mine) == len(model)  # the new forward's only
    del out

"""Recurrent layers beyond the shared cases: initial state as input, subsampling, clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils._pytree import tree_leaves, tree_map

from backpack import backpack, extend
from backpack.extensions import BatchGrad, BatchL2Grad, SumGradSquared, Variance
from tests.oracles import assert_first_order

DTYPE = torch.float64
N, T, F, H = 3, 5, 4, 3


class WithState(nn.Module):
    """``rnn(x, hx)`` with a fixed initial state ``hx`` (positional or keyword)."""

    def __init__(self, rnn: nn.RNNBase, hx, keyword: bool):
        super().__init__()
        self.rnn, self.hx, self.keyword = rnn, hx, keyword

    def forward(self, x):
        return self.rnn(x, hx=self.hx) if self.keyword else self.rnn(x, self.hx)


def _loss(out) -> torch.Tensor:
    """A non-linear loss of every output leaf, a sum over samples."""
    return sum((t.sin() + t.square()).sum() for t in tree_leaves(out))


def _state(rnn: nn.RNNBase, n: int):
    dirs = 2 if rnn.bidirectional else 1
    h0 = torch.randn(rnn.num_layers * dirs, n, rnn.proj_size or rnn.hidden_size, dtype=DTYPE)
    if isinstance(rnn, nn.LSTM):
        return h0, torch.randn(rnn.num_layers * dirs, n, rnn.hidden_size, dtype=DTYPE)
    return h0


def _per_sample_loop(rnn: nn.RNNBase, x, hx) -> dict[str, torch.Tensor]:
    """Reference: autograd on each sample alone (its slice of input and initial state)."""
    ax = 0 if rnn.batch_first else 1
    params = dict(rnn.named_parameters())
    rows = []
    for i in range(x.shape[ax]):
        xi = x.narrow(ax, i, 1)
        hi = tree_map(lambda t, i=i: t[:, i : i + 1], hx)
        grads = torch.autograd.grad(_loss(rnn(xi, hi)), list(params.values()))
        rows.append(dict(zip(params, grads)))
    return {k: torch.stack([r[k] for r in rows]) for k in params}


MODULES = {
    "RNN-relu": lambda bf: nn.RNN(F, H, nonlinearity="relu", batch_first=bf),
    "GRU-2layer-bidir": lambda bf: nn.GRU(F, H, num_layers=2, bidirectional=True, batch_first=bf),
    "LSTM-2layer-bidir-proj": lambda bf: nn.LSTM(
        F, H, num_layers=2, bidirectional=True, proj_size=2, batch_first=bf
    ),
    "LSTM-nobias": lambda bf: nn.LSTM(F, H, bias=False, batch_first=bf),
}


@pytest.mark.parametrize("subsampling", [None, [2, 0, 0]], ids=["all", "sub"])
@pytest.mark.parametrize("keyword", [False, True], ids=["hx-pos", "hx-kw"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["bf", "tf"])
@pytest.mark.parametrize("name", MODULES)
def test_initial_state_matches_per_sample_loop(name, batch_first, keyword, subsampling):
    """Initial state given as input, either layout, optionally subsampled, vs an autograd loop."""
    torch.manual_seed(0)
    rnn = MODULES[name](batch_first).to(DTYPE)
    x = torch.randn(*((N, T) if batch_first else (T, N)), F, dtype=DTYPE)
    hx = _state(rnn, N)
    ref = _per_sample_loop(copy.deepcopy(rnn), x, hx)
    model = extend(WithState(rnn, hx, keyword))
    exts = [e(subsampling=subsampling) for e in (BatchGrad, BatchL2Grad, SumGradSquared, Variance)]
    with backpack(*exts):
        _loss(model(x)).backward()
    for pname, p in rnn.named_parameters():
        torch.testing.assert_close(p.grad, ref[pname].sum(0))
    sub = slice(None) if subsampling is None else subsampling
    assert_first_order(dict(rnn.named_parameters()), {k: g[sub] for k, g in ref.items()})


@pytest.mark.parametrize("cls", [nn.RNN, nn.LSTM, nn.GRU])
def test_dropout_in_train_mode_raises(cls):
    """Inter-layer dropout masks cannot be recovered: a clear error in train mode, fine in eval."""
    rnn = extend(cls(F, H, num_layers=2, dropout=0.5, batch_first=True).to(DTYPE))
    x = torch.randn(N, T, F, dtype=DTYPE)
    with backpack(BatchGrad()), pytest.raises(NotImplementedError, match=r"module\.eval\(\)"):
        _loss(rnn(x)).backward()
    rnn.eval()
    with backpack(BatchGrad()):
        _loss(rnn(x)).backward()
    assert rnn.weight_ih_l1.grad_batch.shape == (N, *rnn.weight_ih_l1.shape)


def test_packed_sequence_raises():
    """PackedSequence inputs are refused with a remedy."""
    rnn = extend(nn.LSTM(F, H, batch_first=True).to(DTYPE))
    x = torch.randn(N, T, F, dtype=DTYPE)
    packed = pack_padded_sequence(x, [5, 3, 2], batch_first=True)
    with backpack(BatchGrad()), pytest.raises(NotImplementedError, match="PackedSequence"):
        out, (h, c) = rnn(packed)
        _loss((out.data, h, c)).backward()

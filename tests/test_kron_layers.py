"""Kronecker factors of the parametrised layers that are no plain matrix product: normalisation
layers (their exact block ``[G]``), Embedding, EmbeddingBag and PositionalEmbedding (``[A, G]``,
``W [V, D]`` acting as a Linear weight ``W^T`` on one-hot rows), recurrent layers (Linears
shared over time steps)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backpack import backpack, extend
from backpack.custom_module.position import PositionalEmbedding
from backpack.custom_module.reduce_tuple import ReduceTuple
from backpack.extensions import KFAC, KFLR, KFRA
from backpack.utils.kroneckers import kfacs_to_mat
from tests.cases import TimeMajor
from tests.oracles import ggn_block

D, N = torch.float64, 4


def _run(model, lossfunc, x, y, *exts):
    extend(model)
    torch.manual_seed(1)
    with backpack(*exts):
        extend(lossfunc)(model(x), y).backward()


NORMS = {
    "LayerNorm": (lambda: nn.LayerNorm(4), (3, 4)),
    "LayerNorm-2dims": (lambda: nn.LayerNorm((3, 4)), (3, 4)),
    "RMSNorm": (lambda: nn.RMSNorm(4), (3, 4)),
    "GroupNorm": (lambda: nn.GroupNorm(2, 4), (4, 3)),
    "InstanceNorm1d": (lambda: nn.InstanceNorm1d(4, affine=True), (4, 3)),
    "BatchNorm1d-eval": (lambda: nn.BatchNorm1d(4).eval(), (4, 3)),
}


def _norm_problem(name: str, n: int = N):
    torch.manual_seed(0)
    layer, shape = NORMS[name]
    model = nn.Sequential(layer(), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)).to(D)
    for p in model[0].parameters():  # away from the initial ones and zeros
        p.data = torch.randn_like(p)
    return model, nn.CrossEntropyLoss(), torch.randn(n, *shape, dtype=D), torch.randint(0, 3, (n,))


@pytest.mark.parametrize("name", NORMS)
def test_norm_parameters_get_their_exact_block(name):
    """KFLR: ``[G]`` is the exact GGN block; KFAC: an MC estimate of it; KFRA at batch size one
    (where its batch average is exact): the same block."""
    model, lossfunc, x, y = _norm_problem(name)
    _run(model, lossfunc, x, y, KFLR(), KFAC(mc_samples=2))
    for key, p in model[0].named_parameters():
        torch.testing.assert_close(p.kflr[0], ggn_block(model, lossfunc, x, y, f"0.{key}"))
        assert len(p.kfac) == 1 and p.kfac[0].shape == (p.numel(), p.numel())
    model, lossfunc, x, y = _norm_problem(name, n=1)
    _run(model, lossfunc, x, y, KFRA())
    for key, p in model[0].named_parameters():
        torch.testing.assert_close(p.kfra[0], ggn_block(model, lossfunc, x, y, f"0.{key}"))


def test_kfac_converges_to_kflr_on_a_norm_layer():
    model, lossfunc, x, y = _norm_problem("LayerNorm")
    _run(model, lossfunc, x, y, KFLR(), KFAC(mc_samples=4000))
    w = model[0].weight
    torch.testing.assert_close(w.kfac[0], w.kflr[0], atol=0.05 * w.kflr[0].abs().max(), rtol=0)


def test_batchnorm_in_train_mode_raises():
    model, lossfunc, x, y = _norm_problem("BatchNorm1d-eval")
    model[0].train()
    with pytest.raises(NotImplementedError, match="BatchNorm1d"):
        _run(model, lossfunc, x, y, KFLR())


def _embedding_problem(reduction: str, padding_idx: int | None = None):
    """Embedding -> Linear per position -> MSE over every position: a deep linear network whose
    loss treats positions separately, where the "expand" factors are exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(6, 3, padding_idx=padding_idx), nn.Linear(3, 2)).to(D)
    x = torch.randint(0, 6, (N, 5))
    x[0, :2] = 0  # repeated tokens (and padding where padding_idx=0)
    return model, nn.MSELoss(reduction=reduction), x, torch.randn(N, 5, 2, dtype=D)


@pytest.mark.parametrize("padding_idx", [None, 0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_embedding_factors(reduction, padding_idx):
    """``[A, G]``: ``A = diag(token counts) / (N L)`` (padding not counted), and ``A ⊗ G`` is the
    exact GGN block of the row-major weight here."""
    model, lossfunc, x, y = _embedding_problem(reduction, padding_idx)
    _run(model, lossfunc, x, y, KFLR(), KFAC())
    w = model[0].weight
    a, g = w.kflr
    assert a.shape == (6, 6) and g.shape == (3, 3) and w.kfac[0].shape == (6, 6)
    counts = torch.bincount(x.flatten(), minlength=6).to(D)
    if padding_idx is not None:
        counts[padding_idx] = 0
    torch.testing.assert_close(a, torch.diag(counts) / x.numel())
    torch.testing.assert_close(w.kfac[0], a)
    torch.testing.assert_close(kfacs_to_mat(w.kflr), ggn_block(model, lossfunc, x, y, "0.weight"))


class _Bagged(nn.Module):
    """EmbeddingBag on ragged bags (1-D input and offsets) -> Linear."""

    def __init__(self, mode: str, weights: torch.Tensor | None):
        super().__init__()
        self.bag, self.lin = nn.EmbeddingBag(6, 3, mode=mode), nn.Linear(3, 2)
        self.offsets, self.weights = torch.tensor([0, 3, 4, 6]), weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.bag(x, self.offsets, per_sample_weights=self.weights))


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_embedding_bag_is_one_position(mode):
    """A bag is one position whose input is its weighted one-hot rows summed: exact on
    EmbeddingBag -> Linear -> MSE, with ``per_sample_weights`` (sum) and ragged bags."""
    torch.manual_seed(0)
    weights = torch.rand(8, dtype=D) if mode == "sum" else None
    model, lossfunc = _Bagged(mode, weights).to(D), nn.MSELoss()
    x, y = torch.tensor([0, 2, 2, 5, 1, 3, 4, 0]), torch.randn(4, 2, dtype=D)
    _run(model, lossfunc, x, y, KFLR())
    ggn = ggn_block(model, lossfunc, x, y, "bag.weight")
    torch.testing.assert_close(kfacs_to_mat(model.bag.weight.kflr), ggn)


def test_embedding_bag_max_mode_raises():
    model = nn.Sequential(nn.EmbeddingBag(6, 3, mode="max"), nn.Linear(3, 2)).to(D)
    x = torch.randint(0, 6, (N, 3))
    with pytest.raises(NotImplementedError, match="mode='max'"):
        _run(model, nn.MSELoss(), x, torch.randn(N, 2, dtype=D), KFLR())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_positional_embedding_factors(reduction):
    """``[A, G]`` with ``A = I / L`` on the ``L`` rows the sequence uses (0 beyond), exact on
    positions -> Linear -> MSE; a second call of the layer adds positions (``A`` averaged)."""
    torch.manual_seed(0)
    model = nn.Sequential(PositionalEmbedding(6, 3), nn.Linear(3, 2)).to(D)
    x, y = torch.randn(N, 4, 3, dtype=D), torch.randn(N, 4, 2, dtype=D)
    lossfunc = nn.MSELoss(reduction=reduction)
    _run(model, lossfunc, x, y, KFLR())
    a, g = model[0].weight.kflr
    torch.testing.assert_close(a, torch.diag(torch.tensor([1.0] * 4 + [0.0] * 2, dtype=D)) / 4)
    torch.testing.assert_close(
        kfacs_to_mat(model[0].weight.kflr), ggn_block(model, lossfunc, x, y, "0.weight")
    )
    pos = PositionalEmbedding(4, 3).to(D)
    reused = nn.Sequential(pos, nn.Linear(3, 3), pos, nn.Linear(3, 2)).to(D)
    _run(reused, lossfunc, x, y, KFLR())
    a, g = pos.weight.kflr
    torch.testing.assert_close(a, torch.eye(4, dtype=D) / 4)
    assert g.shape == (3, 3) and torch.linalg.eigvalsh(g).min() > 0


RNNS = {
    "RNN": lambda: nn.RNN(3, 2, batch_first=True),
    "LSTM": lambda: nn.LSTM(3, 2, batch_first=True),
    "GRU": lambda: nn.GRU(3, 2, batch_first=True),
    "LSTM-2layer-bidir-proj": lambda: nn.LSTM(
        3, 3, 2, batch_first=True, bidirectional=True, proj_size=2
    ),
}


def _rnn_problem(name: str, n: int, steps: int):
    torch.manual_seed(0)
    rnn = RNNS[name]()
    out = steps * (rnn.proj_size or rnn.hidden_size) * (2 if rnn.bidirectional else 1)
    model = nn.Sequential(rnn, ReduceTuple(0), nn.Flatten(), nn.Linear(out, 3)).to(D)
    return model, rnn, torch.randn(n, steps, 3, dtype=D), torch.randint(0, 3, (n,))


@pytest.mark.parametrize("name", RNNS)
def test_rnn_weights_are_linears_shared_over_time(name):
    """One step, one sample: ``[G, A]`` (input weights) and the biases' ``[G]`` are exact GGN
    blocks (``h_0 = 0`` leaves ``weight_hh`` without curvature). KFRA equals KFLR at batch size
    one over several steps; KFAC has the same layout."""
    model, rnn, x, y = _rnn_problem(name, n=1, steps=1)
    lossfunc = nn.CrossEntropyLoss()
    _run(model, lossfunc, x, y, KFLR())
    for key, p in rnn.named_parameters():
        block = ggn_block(model, lossfunc, x, y, f"0.{key}")
        torch.testing.assert_close(kfacs_to_mat(p.kflr), block)
    model, rnn, x, y = _rnn_problem(name, n=1, steps=3)
    _run(model, lossfunc, x, y, KFLR(), KFRA(), KFAC())
    for p in rnn.parameters():
        assert len(p.kfac) == len(p.kflr) == len(p.kfra)
        for a, b in zip(p.kfra, p.kflr):
            torch.testing.assert_close(a, b)


def test_kfra_refuses_a_module_that_moves_the_batch_axis():
    """``TimeMajor`` (no rule: the automatic one, which assumes the batch on axis 0) feeding a
    time-major RNN: KFRA's per-sample columns would mix samples and steps, so it raises; KFLR
    only needs whole-batch products and works."""
    torch.manual_seed(0)
    rnn = nn.RNN(3, 2)
    model = nn.Sequential(TimeMajor(), rnn, ReduceTuple(0), TimeMajor(), nn.Flatten())
    model = nn.Sequential(*model, nn.Linear(10, 3)).to(D)
    x, y = torch.randn(2, 5, 3, dtype=D), torch.tensor([0, 2])
    _run(model, nn.CrossEntropyLoss(), x, y, KFLR())
    assert len(rnn.weight_ih_l0.kflr) == 2
    with pytest.raises(NotImplementedError, match="KFRA: TimeMajor.*moves the batch axis"):
        _run(model, nn.CrossEntropyLoss(), x, y, KFRA())

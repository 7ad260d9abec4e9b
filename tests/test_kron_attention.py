"""Kronecker factors (KFAC, KFLR, KFRA) of ``nn.MultiheadAttention``: layout, exactness where
the Linear identities hold, MC convergence, ``expand``/``reduce``, and inside an encoder layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backpack import backpack, extend
from backpack.custom_module.transformer import convert_transformer
from backpack.extensions import KFAC, KFLR, KFRA
from backpack.utils.kroneckers import kfacs_to_mat
from tests.cases import LAYER_CASES  # noqa: F401  (imports cases_attention without a cycle)
from tests.cases_attention import Attend
from tests.oracles import ggn_block

D = torch.float64
E, H = 4, 2
FIELDS = ("kflr", "kfac", "kfra")


def _model(L: int, cross: bool = False, **kw) -> nn.Module:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True, **kw)
    model = nn.Sequential(Attend(mha, cross=cross), nn.Flatten(), nn.Linear(L * E, 3))
    return model.to(D)


def _data(n: int, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(n, L, E, dtype=D), torch.randint(0, 3, (n,))


def _run(model, x, y, *exts, lossfunc=None):
    lossfunc = extend(lossfunc or nn.CrossEntropyLoss())
    extend(model)
    torch.manual_seed(2)
    with backpack(*exts):
        lossfunc(model(x), y).backward()
    return lossfunc


def _check_psd(mat: torch.Tensor) -> None:
    torch.testing.assert_close(mat, mat.T)
    assert torch.linalg.eigvalsh(mat).min() > -1e-10 * max(1.0, mat.abs().max())


def _pairs(factors: list) -> list[list[torch.Tensor]]:
    """A parameter's factors as a list of ``[G, A]`` / ``[G]`` (blocks: several pairs)."""
    return factors if isinstance(factors[0], list) else [factors]


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_layout_symmetric_psd(cross):
    """Self-attention: one pair ``[blockdiag(Gq, Gk, Gv), A]`` for ``in_proj_weight``;
    different q/k/v inputs: one pair per row block. Biases: ``[G]``, their exact GGN block."""
    L = 3
    model, (x, y) = _model(L, cross, add_bias_kv=True), _data(4, L)
    lossfunc = _run(model, x, y, KFLR(), KFAC(), KFRA())
    mha = model[0].mha
    for field in FIELDS:
        w = getattr(mha.in_proj_weight, field)
        if cross:
            assert [[f.shape for f in p] for p in w] == [[(E, E), (E, E)]] * 3
        else:
            assert [f.shape for f in w] == [(3 * E, 3 * E), (E, E)]
        assert [f.shape for f in getattr(mha.out_proj.weight, field)] == [(E, E), (E, E)]
        for name in ("in_proj_bias", "out_proj.bias", "bias_k", "bias_v"):
            (g,) = getattr(mha.get_parameter(name), field)
            assert g.shape == (mha.get_parameter(name).numel(),) * 2
        for p in mha.parameters():
            for pair in _pairs(getattr(p, field)):
                for f in pair:
                    _check_psd(f)
    for name in ("in_proj_bias", "out_proj.bias", "bias_k", "bias_v"):
        block = ggn_block(model, lossfunc, x, y, f"0.mha.{name}")
        torch.testing.assert_close(mha.get_parameter(name).kflr[0], block)


def test_input_second_moments_and_reduce_g():
    """``A`` of in_proj: ``x^T x / (N L)``; of out_proj: the same of the core's output;
    ``reduce`` sums over positions, so out_proj's ``G`` is then its bias's exact block."""
    L, N = 3, 4
    model, (x, y) = _model(L), _data(N, L)
    _run(model, x, y, KFLR(kfac_approx="reduce"))
    mha = model[0].mha
    reduce_a = mha.out_proj.weight.kflr[1]
    torch.testing.assert_close(mha.out_proj.weight.kflr[0], mha.out_proj.bias.kflr[0])
    _run(model, x, y, KFLR())
    flat = x.flatten(0, 1)
    torch.testing.assert_close(mha.in_proj_weight.kflr[1], flat.T @ flat / (N * L))
    core = nn.MultiheadAttention(E, H, batch_first=True).to(D)  # out_proj = identity
    core.load_state_dict(mha.state_dict())
    with torch.no_grad():
        core.out_proj.weight.copy_(torch.eye(E))
        core.out_proj.bias.zero_()
        out = core(x, x, x)[0]
    torch.testing.assert_close(
        mha.out_proj.weight.kflr[1], out.flatten(0, 1).T @ out.flatten(0, 1) / (N * L)
    )
    torch.testing.assert_close(reduce_a, out.mean(1).T @ out.mean(1) / N)


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_batch_one_position_one_exact(loss):
    """N = L = 1: out_proj's and the value block's ``G ⊗ A`` are their exact GGN blocks (as for
    Linear); one key, so the softmax is constant and the q/k blocks vanish."""
    model, (x, y) = _model(1), _data(1, 1)
    lossfunc = nn.CrossEntropyLoss()
    if loss == "mse":
        model[2] = nn.Linear(E, 1).to(D)
        lossfunc, y = nn.MSELoss(), torch.randn(1, 1, dtype=D)
    lossfunc = _run(model, x, y, KFLR(), lossfunc=lossfunc)
    mha = model[0].mha
    torch.testing.assert_close(
        kfacs_to_mat(mha.out_proj.weight.kflr),
        ggn_block(model, lossfunc, x, y, "0.mha.out_proj.weight"),
    )
    block = ggn_block(model, lossfunc, x, y, "0.mha.in_proj_weight")
    kron = kfacs_to_mat(mha.in_proj_weight.kflr)
    torch.testing.assert_close(kron[2 * E * E :, 2 * E * E :], block[2 * E * E :, 2 * E * E :])
    assert kron[: 2 * E * E].abs().max() < 1e-12 and block[: 2 * E * E].abs().max() < 1e-12


class _OneQuery(nn.Module):
    """``mha(x[:, :1], x[:, 1:], x[:, 1:])``: one query position, several keys."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(E, H, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x[:, :1], x[:, 1:], x[:, 1:])[0]


def test_batch_one_query_one_exact_query_block():
    """N = 1 with one query position: the query block's ``Gq ⊗ Aq`` is exact; the key and value
    inputs differ from the query's, so ``in_proj_weight`` holds one pair per block."""
    torch.manual_seed(0)
    model = nn.Sequential(_OneQuery(), nn.Flatten(), nn.Linear(E, 3)).to(D)
    x, y = torch.randn(1, 3, E, dtype=D), torch.tensor([2])
    lossfunc = _run(model, x, y, KFLR())
    pairs = model[0].mha.in_proj_weight.kflr
    assert len(pairs) == 3
    block = ggn_block(model, lossfunc, x, y, "0.mha.in_proj_weight")[: E * E, : E * E]
    assert block.abs().max() > 1e-3
    torch.testing.assert_close(kfacs_to_mat(pairs[0]), block)


def test_expand_equals_reduce_for_one_position():
    model, (x, y) = _model(1), _data(5, 1)
    _run(model, x, y, KFLR())
    expand = {n: p.kflr for n, p in model.named_parameters()}
    _run(model, x, y, KFLR(kfac_approx="reduce"))
    for n, p in model.named_parameters():
        for a, b in zip(expand[n], p.kflr):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kfra_batch_one_equals_kflr(approx):
    """N = 1: the batch-averaged dense block is the exact one, so KFRA = KFLR for every
    parameter, the Linear in front included (the three inputs are one tensor: their Jacobians
    add before the dense block is pulled back)."""
    L = 3
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True)
    model = nn.Sequential(nn.Linear(E, E), Attend(mha), nn.Flatten(), nn.Linear(L * E, 3)).to(D)
    x, y = _data(1, L)
    _run(model, x, y, KFLR(kfac_approx=approx), KFRA(kfac_approx=approx))
    for p in model.parameters():
        for a, b in zip(_pairs(p.kfra), _pairs(p.kflr)):
            for fa, fb in zip(a, b):
                torch.testing.assert_close(fa, fb)


def test_kfac_converges_to_kflr():
    L = 2
    model, (x, y) = _model(L, cross=True), _data(3, L)
    _run(model, x, y, KFLR(), KFAC(mc_samples=20000))
    for p in model[0].mha.parameters():
        for mc_pair, pair in zip(_pairs(p.kfac), _pairs(p.kflr)):
            for mc, exact in zip(mc_pair, pair):
                torch.testing.assert_close(mc, exact, atol=0.05 * exact.abs().max(), rtol=0)


class _Encoder(nn.Module):
    def __init__(self, L: int):
        super().__init__()
        layer = nn.TransformerEncoderLayer(E, H, 8, dropout=0.0, batch_first=True)
        self.layer = convert_transformer(layer)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(L * E, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x))


def test_encoder_layer():
    """Shapes, symmetry, PSD in a converted encoder layer (LayerNorms frozen: no Kronecker
    structure); the out_proj bias's ``[G]`` is its exact GGN block."""
    L = 3
    torch.manual_seed(0)
    model, (x, y) = _Encoder(L).to(D).eval(), _data(4, L)
    for norm in (model.layer.norm1, model.layer.norm2):
        norm.requires_grad_(False)
    lossfunc = _run(model, x, y, KFLR(), KFAC(mc_samples=2))
    mha = model.layer.self_attn
    for field in FIELDS[:2]:
        g, a = getattr(mha.in_proj_weight, field)
        assert g.shape == (3 * E, 3 * E) and a.shape == (E, E)
        for p in model.parameters():
            if p.requires_grad:
                for pair in _pairs(getattr(p, field)):
                    for f in pair:
                        _check_psd(f)
    block = ggn_block(model, lossfunc, x, y, "layer.self_attn.out_proj.bias")
    torch.testing.assert_close(mha.out_proj.bias.kflr[0], block)

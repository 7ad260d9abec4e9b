"""Converted transformer layers: equal to torch's, and extensions on them against the oracles."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from backpack import backpack, extend
from backpack.custom_module.transformer import convert_transformer
from backpack.extensions import (
    HMP,
    KFLR,
    KFRA,
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
from tests.oracles import (
    assert_first_order_and_diagonals,
    assert_kfra_exact_at_batch_one,
    ggn_diag,
    hessian_block,
    per_sample_grads,
)

D = torch.float64
E, L, N = 8, 4, 3


def _causal() -> torch.Tensor:
    return nn.Transformer.generate_square_subsequent_mask(L, dtype=D)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("activation", ["relu", "gelu", nn.ReLU()])
def test_conversion_equals_torch(norm_first, batch_first, activation):
    """Same outputs as nn.Transformer (masks, padding), same parameters."""
    torch.manual_seed(0)
    kw = dict(dropout=0.0, batch_first=batch_first, norm_first=norm_first, activation=activation)
    model = nn.Transformer(E, 2, 2, 2, 16, **kw).to(D).eval()
    conv = convert_transformer(model)
    src, tgt = torch.randn(N, L, E, dtype=D), torch.randn(N, L, E, dtype=D)
    if not batch_first:
        src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[1, -1] = True
    kw = dict(tgt_mask=_causal(), tgt_is_causal=True, src_key_padding_mask=kpm)
    torch.testing.assert_close(conv(src, tgt, **kw), model(src, tgt, **kw))
    assert {id(p) for p in conv.parameters()} == {id(p) for p in model.parameters()}


class _Encoder(nn.Module):
    """A converted encoder layer with a causal mask, then a linear head."""

    def __init__(self, norm_first: bool):
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            E, 2, 16, dropout=0.0, batch_first=True, norm_first=norm_first
        )
        self.layer = convert_transformer(layer)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(L * E, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x, src_mask=_causal(), is_causal=True))


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_extensions(norm_first):
    """Per-sample gradients and the exact GGN diagonal of a converted encoder layer."""
    torch.manual_seed(0)
    model = extend(_Encoder(norm_first).to(D).eval())
    lossfunc = extend(nn.CrossEntropyLoss())
    x, y = torch.randn(N, L, E, dtype=D), torch.randint(0, 3, (N,))
    with backpack(BatchGrad(), DiagGGNExact()):
        lossfunc(model(x), y).backward()
    ref, ggn = per_sample_grads(model, lossfunc, x, y), ggn_diag(model, lossfunc, x, y)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad_batch, ref[name])
        torch.testing.assert_close(p.diag_ggn_exact, ggn[name])


class _Seq2Seq(nn.Module):
    """A converted ``nn.Transformer`` (encoder and decoder layers) on ``src = x``, ``tgt =
    x[:, :-1]`` with a causal target mask, then a linear head: every extension runs through
    the decoder's self- and cross-attention."""

    def __init__(self, norm_first: bool):
        super().__init__()
        model = nn.Transformer(E, 2, 1, 1, 16, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.transformer = convert_transformer(model)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear((L - 1) * E, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(L - 1, dtype=x.dtype)
        out = self.transformer(x, x[:, :-1], tgt_mask=mask, tgt_is_causal=True)
        return self.head(out)


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_every_extension(norm_first):
    """``nn.Transformer`` converted (``extend(..., use_converter=True)``): first-order
    quantities and the diagonals against the oracles, KFRA = KFLR at batch size one, HMP
    against the Hessian block of the decoder's cross-attention weights."""
    torch.manual_seed(0)
    model = _Seq2Seq(norm_first).to(D).eval()
    lossfunc = nn.CrossEntropyLoss()
    x, y = torch.randn(N, L, E, dtype=D), torch.randint(0, 3, (N,))
    exts = [BatchGrad(), BatchL2Grad(), SumGradSquared(), Variance(), DiagGGNExact()]
    exts += [BatchDiagGGNExact(), DiagGGNMC(), DiagHessian(), BatchDiagHessian(), HMP()]
    converted = extend(model, use_converter=True)
    with backpack(*exts):
        extend(lossfunc)(converted(x), y).backward()
    params = dict(converted.named_parameters())
    assert_first_order_and_diagonals(params, model, lossfunc, x, y)
    key = "transformer.decoder.layers.0.multihead_attn.in_proj_weight"
    with sdpa_kernel(SDPBackend.MATH):
        block = hessian_block(model, lossfunc, x, y, key)
    mat = torch.randn(2, *params[key].shape, dtype=D)
    torch.testing.assert_close(params[key].hmp(mat).flatten(1), mat.flatten(1) @ block)
    converted = extend(model, use_converter=True)
    with backpack(KFLR(), KFRA()):
        extend(lossfunc)(converted(x[:1]), y[:1]).backward()
    assert_kfra_exact_at_batch_one(dict(converted.named_parameters()), 1)

"""Converted transformer layers: equal to torch's, and extensions on them against the oracles."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backpack import backpack, extend
from backpack.custom_module.transformer import convert_transformer
from backpack.extensions import BatchGrad, DiagGGNExact
from tests.oracles import ggn_diag, per_sample_grads

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

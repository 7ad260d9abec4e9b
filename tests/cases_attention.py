"""Layer cases of one family, appended to `tests.cases.LAYER_CASES` (same helpers, same gaps).

``nn.MultiheadAttention`` in a chain: a container calls it (it takes query, key and value);
masks are built from the input so each sample's mask is its own (the oracles see one sample).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from tests.cases import LayerCase, _randn

E, H, L = 4, 2, 3


class Attend(nn.Module):
    """``mha(x, kv(x), kv(x))[0]`` with the call options; ``time_major`` transposes around it."""

    def __init__(self, mha: nn.MultiheadAttention, cross: bool = False, mask: str = "", **kw):
        super().__init__()
        self.mha, self.mask, self.kw = mha, mask, kw
        self.k = nn.Linear(E, mha.kdim) if cross else None
        self.v = nn.Linear(E, mha.vdim) if cross else None

    def forward(self, x: Tensor) -> Tensor:
        kw = dict(self.kw)
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).triu(1)
        if "causal" in self.mask:
            kw["attn_mask"] = causal
        if "float" in self.mask:
            kw["attn_mask"] = torch.linspace(-1, 1, L * L, dtype=x.dtype, device=x.device).view(
                L, L
            )
        if "kpm" in self.mask:  # position 0 stays visible: no row is fully masked
            kw["key_padding_mask"] = (x[:, :, 0] > 0) & (torch.arange(L, device=x.device) > 0)
        q = x if self.mha.batch_first else x.transpose(0, 1)
        k = q if self.k is None else self.k(q)
        v = q if self.v is None else self.v(q)
        out = self.mha(q, k, v, **kw)[0]
        return out if self.mha.batch_first else out.transpose(0, 1)


def _mha(name: str, mha: Callable[[], nn.MultiheadAttention], **kw) -> LayerCase:
    def model():
        return nn.Sequential(Attend(mha(), **kw), nn.Flatten(), nn.LazyLinear(3))

    return LayerCase(name, model, _randn(L, E))


def _bf(**kw) -> Callable[[], nn.MultiheadAttention]:
    return lambda: nn.MultiheadAttention(E, H, batch_first=True, **kw)


CASES: list[LayerCase] = [
    _mha("MHA-bf", _bf()),
    _mha("MHA-tf-", lambda: nn.MultiheadAttention(E, H)),
    _mha("MHA-weights", _bf(), need_weights=True, average_attn_weights=False),
    _mha("MHA-causal", _bf(), mask="causal"),
    _mha("MHA-is_causal", _bf(), mask="causal", need_weights=False, is_causal=True),
    _mha("MHA-floatmask", _bf(), mask="float"),
    _mha("MHA-kpm", _bf(), mask="kpm"),
    _mha("MHA-tf-kpm-causal", lambda: nn.MultiheadAttention(E, H), mask="kpm-causal"),
    _mha("MHA-nobias", _bf(bias=False)),
    _mha("MHA-bias_kv-zero_attn", _bf(add_bias_kv=True, add_zero_attn=True), mask="kpm"),
    _mha("MHA-kdim-vdim", _bf(kdim=3, vdim=5), cross=True),
    _mha("MHA-cross", _bf(), cross=True, mask="causal"),
]
GAPS: dict[str, str] = {}  # case-name substring -> reason, for every extension
HESSIAN_GAPS: dict[str, str] = {  # ... for DiagHessian/BatchDiagHessian only
    "MHA-is_causal": "oracle: torch.func.hessian needs forward AD, which torch's fused attention "
    "kernel (need_weights=False) lacks; the rule itself differentiates explicit ops",
}

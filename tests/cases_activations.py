"""Layer cases of one family, appended to `tests.cases.LAYER_CASES` (same helpers, same gaps):
the activations of modern architectures and upsampling, each between parametrised layers, and
``nn.EmbeddingBag`` on 2-D index inputs (1-D inputs with offsets: tests/test_embedding_bag.py)."""

from __future__ import annotations

from torch import nn

from tests.cases import LayerCase, _chain, _embedding_input, _seq

_ACTIVATIONS = [
    ("GELU", lambda: nn.GELU()),
    ("GELU-tanh", lambda: nn.GELU(approximate="tanh")),
    ("SiLU", lambda: nn.SiLU()),
    ("Mish", lambda: nn.Mish()),
    ("Softplus", lambda: nn.Softplus(beta=2.0, threshold=1.0)),  # both branches are hit
    ("Hardswish", lambda: nn.Hardswish()),
    ("Hardsigmoid", lambda: nn.Hardsigmoid()),
    ("Hardsigmoid-inplace", lambda: nn.Hardsigmoid(inplace=True)),
    ("Softmax", lambda: nn.Softmax(dim=1)),
    ("LogSoftmax", lambda: nn.LogSoftmax(dim=1)),
]

CASES: list[LayerCase] = [
    *(
        _chain(
            f"Linear-{name}-Linear", lambda act=act: [nn.Linear(4, 5), act(), nn.Linear(5, 4)], 4
        )
        for name, act in _ACTIVATIONS
    ),
    _chain("Conv2d-Softmax-channels", lambda: [nn.Conv2d(2, 3, 2), nn.Softmax(dim=1)], 2, 3, 4),
    _chain("Conv2d-LogSoftmax-width", lambda: [nn.Conv2d(2, 3, 2), nn.LogSoftmax(dim=-1)], 2, 3, 4),
    _chain(
        "Conv2d-Upsample-nearest",
        lambda: [nn.Conv2d(2, 3, 2), nn.Upsample(scale_factor=2), nn.Conv2d(3, 2, 3)],
        2,
        4,
        3,
    ),
    _chain(
        "Conv2d-Upsample-bilinear-size",
        lambda: [nn.Conv2d(2, 3, 2), nn.Upsample(size=(5, 4), mode="bilinear"), nn.Conv2d(3, 2, 2)],
        2,
        4,
        3,
    ),
    _chain(
        "Conv2d-UpsamplingBilinear2d",
        lambda: [nn.Conv2d(2, 3, 2), nn.UpsamplingBilinear2d(scale_factor=2), nn.Tanh()],
        2,
        3,
        3,
    ),
    _chain(
        "Conv1d-Upsample-linear-aligned",
        lambda: [
            nn.Conv1d(2, 3, 2),
            nn.Upsample(scale_factor=1.5, mode="linear", align_corners=True),
        ],
        2,
        5,
    ),
]
_BAGS = {
    "EmbeddingBag-sum": dict(mode="sum"),
    "EmbeddingBag-mean-padding_idx": dict(mode="mean", padding_idx=2),
    "EmbeddingBag-max": dict(mode="max"),
}
CASES += [
    LayerCase(name, lambda kw=kw: _seq(nn.EmbeddingBag(7, 3, **kw)), _embedding_input)
    for name, kw in _BAGS.items()
]
GAPS: dict[str, str] = {}  # case-name substring -> reason, for every extension
_NO_ORACLE = "torch has no double backward for hardsigmoid, so the Hessian oracle cannot run"
_NO_BAG_ORACLE = (
    "torch has no double backward for embedding_bag, so the Hessian oracle cannot run "
    "(tests/test_embedding_bag.py checks DiagHessian on an equivalent form)"
)
HESSIAN_GAPS: dict[str, str] = {  # for DiagHessian only
    "Hardsigmoid": _NO_ORACLE,
    "EmbeddingBag": _NO_BAG_ORACLE,
}

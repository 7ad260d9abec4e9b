"""The shared list of problems: layers (every constructor option) x losses x reductions x N.

A layer case builds ``Sequential(layer, Flatten(), LazyLinear(3))`` (or a given model) in float64;
``problems()`` crosses it with the losses, reductions and batch sizes. Known gaps live in ``GAPS``
(case-name substring -> reason), never in scattered skips.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from backpack import backpack, extend
from backpack.custom_module.reduce_tuple import ReduceTuple

DTYPE = torch.float64
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@dataclass(frozen=True)
class LayerCase:
    """A model ending in 3 outputs and a function drawing its input for batch size n."""

    name: str
    model: Callable[[], nn.Module]
    input: Callable[[int], Tensor]


@dataclass(frozen=True)
class Problem:
    case: LayerCase
    loss: str  # "mse", "ce" or "bce"
    reduction: str
    n: int

    @property
    def id(self) -> str:
        return f"{self.case.name}-{self.loss}-{self.reduction}-N{self.n}"

    def skip_gaps(self, gaps: dict[str, str]) -> None:
        """xfail this problem if its id names a known gap."""
        for key, why in gaps.items():
            if key in self.id:
                pytest.xfail(why)

    def run(self, exts: list, device: str = "cpu"):
        """Build, extend model and loss, one backward pass with ``exts``; returns the build."""
        model, lossfunc, x, y = self.build(device)
        extend(model)
        extend(lossfunc)
        torch.manual_seed(3)  # MC extensions
        with backpack(*exts):
            lossfunc(model(x), y).backward()
        return model, lossfunc, x, y

    def build(self, device: str = "cpu", seed: int = 0):
        """Model (float64, eval mode), loss module, input and target, all seeded."""
        torch.manual_seed(seed)
        x = self.case.input(self.n).to(device)
        model = self.case.model().to(device=device)
        model = model.to(DTYPE)
        model.eval()
        with torch.no_grad():
            out = model(x)  # materialises LazyLinear
        _randomise_buffers(model)
        lossfunc = LOSSES[self.loss](reduction=self.reduction)
        return model, lossfunc, x, make_target(self.loss, out)


def make_target(loss: str, out: Tensor) -> Tensor:
    """A random target for the model output ``out``."""
    if loss == "ce":
        shape = (out.shape[0], *out.shape[2:])
        return torch.randint(0, out.shape[1], shape, device=out.device)
    if loss == "bce":
        return torch.rand_like(out)
    return torch.randn_like(out)


def _randomise_buffers(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                if m.affine:
                    m.weight.normal_()
                    m.bias.normal_()


LOSSES = {"mse": nn.MSELoss, "ce": nn.CrossEntropyLoss, "bce": nn.BCEWithLogitsLoss}


def _randn(*shape: int) -> Callable[[int], Tensor]:
    return lambda n: torch.randn(n, *shape, dtype=DTYPE)


def _seq(layer: nn.Module) -> nn.Module:
    return nn.Sequential(layer, nn.Flatten(), nn.LazyLinear(3))


def _case(name: str, layer: Callable[[], nn.Module], *shape: int) -> LayerCase:
    return LayerCase(name, lambda: _seq(layer()), _randn(*shape))


class AllOutputs(nn.Module):
    """Feeds every output of a recurrent layer (sequence output and final states) onward."""

    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn

    def forward(self, x: Tensor) -> Tensor:
        out = self.rnn(x)
        leaves = torch.utils._pytree.tree_leaves(out)
        batch_first = self.rnn.batch_first
        flat = [leaves[0] if batch_first else leaves[0].transpose(0, 1)]
        flat += [t.transpose(0, 1) for t in leaves[1:]]  # states are [layers, n, h]
        return torch.cat([t.flatten(1) for t in flat], 1)


class TimeMajor(nn.Module):
    """``[n, t, f] -> [t, n, f]`` (and back), for layers with ``batch_first=False``."""

    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(0, 1)


def _rnn_cases() -> list[LayerCase]:
    cases = []
    configs = {
        "RNN": dict(),
        "RNN-relu-nobias": dict(nonlinearity="relu", bias=False),
        "LSTM": dict(),
        "GRU": dict(),
        "LSTM-2layer-bidir": dict(num_layers=2, bidirectional=True),
        "GRU-2layer-bidir": dict(num_layers=2, bidirectional=True),
        "RNN-2layer": dict(num_layers=2),
        "LSTM-proj": dict(proj_size=2),
    }
    for name, kw in configs.items():
        cls = getattr(nn, name.split("-")[0])
        for bf in (True, False):
            tag = f"{name}-{'bf' if bf else 'tf'}"

            def seq(cls=cls, kw=kw, bf=bf):
                rnn = cls(4, 3, batch_first=bf, **kw)
                pre, post = ([], []) if bf else ([TimeMajor()], [TimeMajor()])
                return nn.Sequential(
                    *pre, rnn, ReduceTuple(0), *post, nn.Flatten(), nn.LazyLinear(3)
                )

            def allout(cls=cls, kw=kw, bf=bf):
                rnn = cls(4, 3, batch_first=bf, **kw)
                pre = [] if bf else [TimeMajor()]
                return nn.Sequential(*pre, AllOutputs(rnn), nn.LazyLinear(3))

            cases.append(LayerCase(f"{tag}-seq", seq, _randn(5, 4)))
            cases.append(LayerCase(f"{tag}-all", allout, _randn(5, 4)))
    return cases


def _embedding_input(n: int) -> Tensor:
    return torch.randint(0, 7, (n, 4))


LAYER_CASES: list[LayerCase] = [
    # Linear
    _case("Linear", lambda: nn.Linear(5, 4), 5),
    _case("Linear-nobias", lambda: nn.Linear(5, 4, bias=False), 5),
    _case("Linear-extradims", lambda: nn.Linear(5, 4), 2, 3, 5),
    # Conv1d/2d/3d
    _case("Conv1d", lambda: nn.Conv1d(2, 3, 3), 2, 8),
    _case(
        "Conv1d-stride-pad-dil", lambda: nn.Conv1d(2, 3, 3, stride=2, padding=2, dilation=2), 2, 9
    ),
    _case("Conv1d-groups-nobias", lambda: nn.Conv1d(4, 6, 3, groups=2, bias=False), 4, 7),
    _case("Conv1d-same", lambda: nn.Conv1d(2, 3, 4, padding="same", dilation=2), 2, 8),
    _case("Conv1d-valid", lambda: nn.Conv1d(2, 3, 3, padding="valid"), 2, 8),
    _case("Conv1d-reflect", lambda: nn.Conv1d(2, 3, 3, padding=2, padding_mode="reflect"), 2, 8),
    _case("Conv2d", lambda: nn.Conv2d(2, 3, 3), 2, 6, 5),
    _case(
        "Conv2d-stride-pad-dil",
        lambda: nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
        2,
        7,
        6,
    ),
    _case("Conv2d-groups", lambda: nn.Conv2d(4, 6, 3, groups=2), 4, 5, 5),
    _case("Conv2d-depthwise", lambda: nn.Conv2d(3, 6, 3, groups=3, bias=False), 3, 5, 5),
    _case("Conv2d-same", lambda: nn.Conv2d(2, 3, (3, 4), padding="same"), 2, 5, 6),
    _case(
        "Conv2d-circular", lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"), 2, 5, 5
    ),
    _case(
        "Conv2d-replicate",
        lambda: nn.Conv2d(2, 3, 3, padding=(1, 2), padding_mode="replicate"),
        2,
        5,
        5,
    ),
    _case("Conv2d-1x1", lambda: nn.Conv2d(3, 4, 1), 3, 4, 4),
    _case("Conv3d", lambda: nn.Conv3d(2, 3, 2), 2, 4, 3, 4),
    _case(
        "Conv3d-stride-pad-groups",
        lambda: nn.Conv3d(2, 4, 3, stride=2, padding=1, groups=2),
        2,
        5,
        4,
        5,
    ),
    _case(
        "Conv3d-same-reflect",
        lambda: nn.Conv3d(2, 3, 3, padding="same", padding_mode="reflect"),
        2,
        4,
        4,
        3,
    ),
    # ConvTranspose1d/2d/3d
    _case("ConvTranspose1d", lambda: nn.ConvTranspose1d(2, 3, 3), 2, 6),
    _case(
        "ConvTranspose1d-stride-outpad",
        lambda: nn.ConvTranspose1d(2, 3, 3, stride=2, padding=1, output_padding=1),
        2,
        5,
    ),
    _case(
        "ConvTranspose1d-groups-dil-nobias",
        lambda: nn.ConvTranspose1d(4, 6, 3, groups=2, dilation=2, bias=False),
        4,
        5,
    ),
    _case("ConvTranspose2d", lambda: nn.ConvTranspose2d(2, 3, 3), 2, 4, 5),
    _case(
        "ConvTranspose2d-stride-pad-outpad",
        lambda: nn.ConvTranspose2d(
            2, 3, (3, 2), stride=(2, 3), padding=(1, 0), output_padding=(1, 2)
        ),
        2,
        4,
        3,
    ),
    _case(
        "ConvTranspose2d-groups-dil",
        lambda: nn.ConvTranspose2d(4, 2, 3, groups=2, dilation=2),
        4,
        3,
        4,
    ),
    _case("ConvTranspose3d", lambda: nn.ConvTranspose3d(2, 3, 2), 2, 3, 3, 2),
    _case(
        "ConvTranspose3d-stride-groups",
        lambda: nn.ConvTranspose3d(2, 4, 3, stride=2, padding=1, output_padding=1, groups=2),
        2,
        3,
        2,
        3,
    ),
    # BatchNorm (eval mode)
    _case("BatchNorm1d", lambda: nn.BatchNorm1d(4), 4),
    _case("BatchNorm1d-seq", lambda: nn.BatchNorm1d(3), 3, 5),
    _case("BatchNorm2d", lambda: nn.BatchNorm2d(3), 3, 4, 4),
    _case("BatchNorm3d", lambda: nn.BatchNorm3d(2), 2, 3, 2, 3),
    # Embedding
    LayerCase("Embedding", lambda: _seq(nn.Embedding(7, 3)), _embedding_input),
    LayerCase(
        "Embedding-padding_idx", lambda: _seq(nn.Embedding(7, 3, padding_idx=2)), _embedding_input
    ),
    # RNN, LSTM, GRU
    *_rnn_cases(),
]


def _chain(name: str, layers: Callable[[], list[nn.Module]], *shape: int) -> LayerCase:
    return LayerCase(
        name, lambda: nn.Sequential(*layers(), nn.Flatten(), nn.LazyLinear(3)), _randn(*shape)
    )


# parameter-free layers between parametrised ones: every layer's input Jacobian is exercised
CHAIN_CASES: list[LayerCase] = [
    *(
        _chain(
            f"Linear-{act.__name__}-Linear",
            lambda act=act, kw=kw: [nn.Linear(4, 5), act(**kw), nn.Linear(5, 4)],
            4,
        )
        for act, kw in [
            (nn.ReLU, {}),
            (nn.Sigmoid, {}),
            (nn.Tanh, {}),
            (nn.LeakyReLU, {"negative_slope": 0.1}),
            (nn.LogSigmoid, {}),
            (nn.ELU, {"alpha": 0.7}),
            (nn.SELU, {}),
            (nn.Identity, {}),
            (nn.Dropout, {"p": 0.3}),
        ]
    ),
    _chain(
        "Linear-ReLUinplace-Linear",
        lambda: [nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 4)],
        4,
    ),
    _chain(
        "Linear-Sigmoid-extradims", lambda: [nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 2)], 3, 4
    ),
    _chain("Linear-BatchNorm1d-Tanh", lambda: [nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh()], 4),
    _chain(
        "Linear-Unflatten-Conv1d",
        lambda: [nn.Linear(4, 6), nn.Unflatten(1, (2, 3)), nn.Conv1d(2, 2, 2)],
        4,
    ),
    _chain(
        "Conv1d-MaxPool1d-Conv1d",
        lambda: [nn.Conv1d(2, 3, 2), nn.MaxPool1d(2, ceil_mode=True), nn.Conv1d(3, 2, 2)],
        2,
        8,
    ),
    _chain(
        "Conv1d-AvgPool1d-ConvT1d",
        lambda: [
            nn.Conv1d(2, 3, 2),
            nn.AvgPool1d(3, 2, padding=1, count_include_pad=False),
            nn.ConvTranspose1d(3, 2, 2, stride=2),
        ],
        2,
        8,
    ),
    _chain(
        "Conv1d-AdaptiveAvgPool1d-Sigmoid",
        lambda: [nn.Conv1d(2, 3, 2), nn.AdaptiveAvgPool1d(3), nn.Sigmoid()],
        2,
        9,
    ),
    _chain(
        "Conv1d-ConstantPad1d-Conv1d",
        lambda: [nn.Conv1d(2, 3, 2), nn.ConstantPad1d((1, 2), 0.5), nn.Conv1d(3, 2, 3)],
        2,
        6,
    ),
    _chain(
        "Conv2d-MaxPool2d-Conv2d",
        lambda: [
            nn.Conv2d(2, 3, 3, padding=1),
            nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
            nn.Conv2d(3, 2, 2),
        ],
        2,
        7,
        7,
    ),
    _chain(
        "Conv2d-AvgPool2d-Tanh",
        lambda: [
            nn.Conv2d(2, 3, 2),
            nn.AvgPool2d(3, 2, count_include_pad=False, ceil_mode=True),
            nn.Tanh(),
        ],
        2,
        7,
        6,
    ),
    _chain(
        "Conv2d-AdaptiveAvgPool2d-Conv2d",
        lambda: [nn.Conv2d(2, 3, 2), nn.AdaptiveAvgPool2d((3, 2)), nn.Conv2d(3, 2, 1)],
        2,
        8,
        6,
    ),
    _chain(
        "Conv2d-AdaptiveMaxPool2d-ELU",
        lambda: [nn.Conv2d(2, 3, 2), nn.AdaptiveMaxPool2d(2), nn.ELU()],
        2,
        6,
        5,
    ),
    _chain(
        "Conv2d-ZeroPad2d-Conv2d",
        lambda: [nn.Conv2d(2, 3, 2), nn.ZeroPad2d((1, 0, 2, 1)), nn.Conv2d(3, 2, 3, groups=1)],
        2,
        5,
        5,
    ),
    _chain(
        "Conv2d-ConstantPad2d-ConvT2d",
        lambda: [
            nn.Conv2d(2, 4, 2),
            nn.ConstantPad2d(1, -0.3),
            nn.ConvTranspose2d(4, 2, 3, stride=2, groups=2),
        ],
        2,
        4,
        4,
    ),
    _chain(
        "Conv2d-BatchNorm2d-Sigmoid-Conv2d",
        lambda: [
            nn.Conv2d(2, 3, 2),
            nn.BatchNorm2d(3),
            nn.Sigmoid(),
            nn.Conv2d(3, 2, 2, stride=2, padding=1),
        ],
        2,
        5,
        5,
    ),
    _chain(
        "Conv3d-MaxPool3d-Conv3d",
        lambda: [nn.Conv3d(2, 2, 2), nn.MaxPool3d(2), nn.Conv3d(2, 2, 1)],
        2,
        5,
        5,
        4,
    ),
    _chain(
        "Conv3d-AvgPool3d-ConstantPad3d",
        lambda: [nn.Conv3d(2, 2, 2), nn.AvgPool3d(2, ceil_mode=True), nn.ConstantPad3d(1, 0.0)],
        2,
        4,
        5,
        4,
    ),
    _chain(
        "Conv3d-AdaptiveAvgPool3d-BatchNorm3d",
        lambda: [nn.Conv3d(2, 2, 2), nn.AdaptiveAvgPool3d((2, 1, 3)), nn.BatchNorm3d(2)],
        2,
        4,
        4,
        5,
    ),
    _chain(
        "ConvT2d-Sigmoid-ConvT2d",
        lambda: [
            nn.ConvTranspose2d(2, 3, 2),
            nn.Sigmoid(),
            nn.ConvTranspose2d(3, 2, 3, padding=1, dilation=2),
        ],
        2,
        3,
        3,
    ),
    _chain(
        "ConvT3d-Tanh-Conv3d",
        lambda: [nn.ConvTranspose3d(2, 2, 2), nn.Tanh(), nn.Conv3d(2, 2, 2, padding=1)],
        2,
        2,
        2,
        3,
    ),
    LayerCase(
        "Embedding-Linear-extradims",
        lambda: nn.Sequential(
            nn.Embedding(7, 4), nn.Linear(4, 3), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)
        ),
        _embedding_input,
    ),
]

# case-name substring -> why it is not expected to pass
# layer families kept in files of their own (imported here: they use the helpers above)
from tests import cases_activations, cases_attention, cases_norm  # noqa: E402

_FAMILIES = (cases_activations, cases_norm, cases_attention)
LAYER_CASES += [c for f in _FAMILIES for c in f.CASES]

GAPS: dict[str, str] = {k: v for f in _FAMILIES for k, v in f.GAPS.items()}
GGN_GAPS: dict[str, str] = {
    **GAPS,
    "-all-": "raises: second-order quantities pass only the first output of a module with "
    "several (here an RNN's final states feed the loss too)",
}
SECOND_ORDER_GAPS: dict[str, str] = {
    **GGN_GAPS,
    **{k: v for f in _FAMILIES for k, v in f.HESSIAN_GAPS.items()},
}


def params(problems: list[Problem], core: Callable[[Problem], bool]) -> list:
    """``problems`` as pytest params with their ids; those not ``core`` are marked ``slow``."""
    return [pytest.param(p, id=p.id, marks=() if core(p) else pytest.mark.slow) for p in problems]


def one_loss_each(p: Problem) -> bool:
    """One loss per (reduction, N), rotating over the cases: every case meets two losses and both
    reductions, every loss every family of layers (the loss's root is tested on its own in
    test_losses.py; crossing it with every layer repeats the same code)."""
    shift = {("mean", 3): 0, ("sum", 1): 1}.get((p.reduction, p.n), 2)
    return p.loss == list(LOSSES)[(len(p.case.name) + shift) % len(LOSSES)]


def problems(cases: list[LayerCase] = LAYER_CASES) -> list[Problem]:
    """Every case x loss x reduction x N in {1, 3}."""
    return [
        Problem(c, loss, red, n)
        for c in cases
        for loss in LOSSES
        for red in ("mean", "sum")
        for n in (1, 3)
    ]

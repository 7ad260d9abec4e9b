"""Tiny configurations of torchvision, timm and Hugging Face models (float64, eval mode, no
network), and generic float64 oracles for them (``tests/test_zoo.py``).

The oracles take a callable ``logits(model, x)`` (the model's output as handed to the loss) and
a cross-entropy loss, so they work for every model here: per-sample gradients by one
``autograd.grad`` per sample of the batched graph, GGN diagonals by one vector-Jacobian product
per column of the loss Hessian's square root, Hessian diagonal entries by double backward.
"""

from __future__ import annotations

import copy
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from backpack import disable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are built from configs: no downloads
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
D = torch.float64

_TORCHVISION_STUBS: list = []  # the Library defining placeholder operators must stay alive


def import_torchvision():
    """``import torchvision``, also where its C extension cannot load.

    PyPI's torchvision 0.28.0 wheel for Linux is a CUDA build: beside CPU torch 2.13.0 its
    extension fails to load, and ``import torchvision`` then raises ``RuntimeError: operator
    torchvision::nms does not exist`` (its Python code registers fake kernels for operators the
    extension would have defined). The classification models are pure Python and never call
    those operators, so each missing one is defined with a placeholder schema (never run) and
    the import retried, the partly imported ``torchvision*`` modules removed first. Where
    torchvision imports normally (a CPU build), nothing is defined.

    Returns:
        The ``torchvision`` module.
    """
    defined: set[str] = set()
    while True:
        try:
            import torchvision

            return torchvision
        except RuntimeError as err:
            found = re.search(r"operator torchvision::(\w+) does not exist", str(err))
            if found is None or found.group(1) in defined:
                raise
            if not _TORCHVISION_STUBS:
                _TORCHVISION_STUBS.append(torch.library.Library("torchvision", "FRAGMENT"))
            _TORCHVISION_STUBS[0].define(f"{found.group(1)}(Tensor x) -> Tensor")
            defined.add(found.group(1))
            for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
                del sys.modules[name]


class Logits(nn.Module):
    """A Hugging Face model returning ``.logits`` (a ``ModelOutput`` otherwise)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor) -> Tensor:
        return self.model(ids).logits


@dataclass
class Zoo:
    """One model of the zoo: the module to extend, an input, targets, and ``head``, what is
    done to the module's output before the loss (outside the extended modules, as users do:
    ``logits.view(-1, V)`` of a language model, or its last position)."""

    model: nn.Module
    x: Tensor
    y: Tensor
    head: Callable[[Tensor], Tensor] = field(default=lambda out: out)
    classifier: str | None = None  # CLASSIFIERS[name]

    def logits(self, model: nn.Module | None = None) -> Tensor:
        return self.head((model or self.model)(self.x))


N = 2  # batch
T, V = 4, 11  # language models: sequence length, vocabulary


def _images(c: int, h: int, classes: int) -> tuple[Tensor, Tensor]:
    return torch.randn(N, c, h, h, dtype=D), torch.randint(0, classes, (N,))


def mlp() -> Zoo:
    """A control: layers backpack supports throughout (curved, so its Hessian is not its GGN)."""
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    return Zoo(model, torch.randn(N, 6, dtype=D), torch.randint(0, 4, (N,)))


def cnn() -> Zoo:
    """A control: convolution, eval-mode BatchNorm, in-place Hardswish, in modules."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Hardswish(inplace=True),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 5),
    )  # fmt: skip
    model[1].running_mean.normal_()
    model[1].running_var.uniform_(0.5, 2)
    return Zoo(model, *_images(3, 6, 5))


def resnet18() -> Zoo:
    """ResNet-18's blocks, one per stage (torchvision's ResNet class; its widths are fixed)."""
    models = import_torchvision().models
    model = models.resnet.ResNet(models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)
    return Zoo(model, *_images(3, 16, 10))


def mobilenet_v3_small() -> Zoo:
    """MobileNetV3-small at a quarter of its widths (squeeze-excitation, in-place Hardswish)."""
    model = import_torchvision().models.mobilenet_v3_small(num_classes=10, width_mult=0.25)
    return Zoo(model, *_images(3, 16, 10))


def tv_vit() -> Zoo:
    from_tv = import_torchvision().models.vision_transformer.VisionTransformer
    model = from_tv(
        image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16,
        num_classes=5,
    )  # fmt: skip
    return Zoo(model, *_images(3, 16, 5))


def timm_vit() -> Zoo:
    import_torchvision()  # timm imports torchvision
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        img_size=16, patch_size=8, depth=1, num_heads=2, embed_dim=8, num_classes=5
    )
    return Zoo(model, *_images(3, 16, 5))


def timm_convnext() -> Zoo:
    import_torchvision()
    from timm.models.convnext import ConvNeXt

    # timm's ConvNeXt has four stages (stem /4, then /2 each): 32x32 inputs end at 1x1
    model = ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 8, 16, 16), num_classes=5)
    return Zoo(model, *_images(3, 32, 5))


def _ids() -> Tensor:
    return torch.randint(0, V, (N, T))


def gpt2(last: bool = False) -> Zoo:
    import_torchvision()  # transformers imports torchvision
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=V, n_positions=16)
    config._attn_implementation = "eager"
    return _lm(Logits(GPT2LMHeadModel(config)), last)


def llama(last: bool = False) -> Zoo:
    import_torchvision()  # transformers imports torchvision
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=V, max_position_embeddings=16,
    )  # fmt: skip
    config._attn_implementation = "eager"
    return _lm(Logits(LlamaForCausalLM(config)), last)


def _lm(model: nn.Module, last: bool) -> Zoo:
    """Next-token targets at every position (``[N * T, V]`` to the loss), or the last only."""
    if last:
        return Zoo(model, _ids(), torch.randint(0, V, (N,)), head=lambda out: out[:, -1])
    return Zoo(model, _ids(), torch.randint(0, V, (N * T,)), head=lambda out: out.view(-1, V))


def bert() -> Zoo:
    import_torchvision()  # transformers imports torchvision
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        vocab_size=V, max_position_embeddings=16, num_labels=3,
    )  # fmt: skip
    config._attn_implementation = "eager"
    model = Logits(BertForSequenceClassification(config))
    return Zoo(model, _ids(), torch.randint(0, 3, (N,)))


BUILDERS: dict[str, Callable[[], Zoo]] = {
    "mlp": mlp,
    "cnn": cnn,
    "resnet18": resnet18,
    "mobilenet_v3_small": mobilenet_v3_small,
    "tv_vit": tv_vit,
    "timm_vit": timm_vit,
    "timm_convnext": timm_convnext,
    "gpt2": gpt2,
    "gpt2_last": lambda: gpt2(last=True),
    "llama": llama,
    "llama_last": lambda: llama(last=True),
    "bert": bert,
}


# the Linear feeding the loss directly, of the models whose logits are [N, C]
CLASSIFIERS = {
    "mlp": "2", "cnn": "5", "resnet18": "fc", "mobilenet_v3_small": "classifier.3",
    "tv_vit": "heads.head", "timm_vit": "head", "timm_convnext": "head.fc",
    "bert": "model.classifier",
}  # fmt: skip


def build(name: str) -> Zoo:
    """The model ``name`` in float64 and eval mode (dropout off, BatchNorm's running
    statistics), its input and targets, all seeded."""
    torch.manual_seed(0)
    zoo = BUILDERS[name]()
    zoo.classifier = CLASSIFIERS.get(name)
    zoo.model = zoo.model.to(D).eval()
    return zoo


# ---------------------------------------------------------------------------- the oracles


def _rows(zoo: Zoo, logits: Tensor) -> Tensor:
    """The sample each row of the loss's ``[R, C]`` logits belongs to (``[R]``)."""
    return torch.arange(zoo.x.shape[0]).repeat_interleave(logits.shape[0] // zoo.x.shape[0])


def _params(model: nn.Module) -> dict[str, Tensor]:
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


def per_sample_grads(zoo: Zoo) -> dict[str, Tensor]:
    """``[N, *P]``: gradient of each sample's share of the mean cross-entropy (its rows of the
    logits), one ``autograd.grad`` per sample through the batched forward."""
    params = _params(zoo.model)
    with disable():
        logits = zoo.logits()
    rows = _rows(zoo, logits)
    losses = nn.functional.cross_entropy(logits, zoo.y, reduction="none") / logits.shape[0]
    out = []
    for n in range(zoo.x.shape[0]):
        grads = torch.autograd.grad(losses[rows == n].sum(), list(params.values()),
                                    retain_graph=True, allow_unused=True)  # fmt: skip
        out.append(
            [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params.values())]
        )
    return {k: torch.stack([o[i] for o in out]) for i, k in enumerate(params)}


def loss_hessian_roots(logits: Tensor) -> Tensor:
    """``[R, C, C]``: per row, ``S = (diag(sqrt p) - p sqrt(p)^T) / sqrt(R)`` with
    ``S S^T = (diag(p) - p p^T) / R``, the Hessian of the mean cross-entropy w.r.t. that row."""
    p = logits.detach().softmax(-1)
    s = p.sqrt()
    return (torch.diag_embed(s) - p.unsqueeze(-1) * s.unsqueeze(-2)) / logits.shape[0] ** 0.5


def ggn_columns(zoo: Zoo, names: list[str] | None = None, chunk: int = 8):
    """``J^T s`` for the columns ``s`` of the loss Hessian root (each placed in its row of the
    logits), ``chunk`` columns at a time: yields ``({name: [k, *P]}, sample of each [k])``
    (chunks keep the memory at ``chunk`` gradients: resnet18 has 11M parameters)."""
    params = _params(zoo.model)
    if names is not None:
        params = {k: params[k] for k in names}
    with disable():
        logits = zoo.logits()
    r, c = logits.shape
    roots = loss_hessian_roots(logits)  # [r, c (out), c (column)]
    sample = _rows(zoo, logits)
    for start in range(0, r * c, chunk):
        pos = torch.arange(start, min(start + chunk, r * c))
        row, col = pos // c, pos % c
        cols = torch.zeros(len(pos), r, c, dtype=logits.dtype)
        cols[torch.arange(len(pos)), row] = roots[row, :, col]
        try:
            grads = torch.autograd.grad(logits, list(params.values()), cols, retain_graph=True,
                                        is_grads_batched=True, materialize_grads=True)  # fmt: skip
        except (RuntimeError, NotImplementedError):  # no batching rule: one column at a time
            each = [
                torch.autograd.grad(
                    logits, list(params.values()), one, retain_graph=True, materialize_grads=True
                )  # fmt: skip
                for one in cols
            ]
            grads = [torch.stack(g) for g in zip(*each)]
        yield dict(zip(params, grads)), sample[row]


def ggn_diag(zoo: Zoo) -> dict[str, Tensor]:
    """``[N, *P]``: each sample's GGN diagonal ``sum_s (J^T s)^2`` over its columns."""
    out = {k: torch.zeros(zoo.x.shape[0], *p.shape, dtype=p.dtype)
           for k, p in _params(zoo.model).items()}  # fmt: skip
    for grads, sample in ggn_columns(zoo):
        for k, g in grads.items():
            out[k].index_add_(0, sample, g.square())
    return out


def ggn_block(zoo: Zoo, name: str) -> Tensor:
    """``[P, P]``: the GGN block of one parameter (flattened, row-major)."""
    cols = torch.cat([g[name].flatten(1) for g, _ in ggn_columns(zoo, [name])])
    return cols.T @ cols


class _Hardsigmoid(nn.Module):
    """``relu6(x + 3) / 6``: Hardsigmoid from ops that torch differentiates twice."""

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.relu6(x + 3) / 6


def _twice_differentiable(model: nn.Module) -> nn.Module:
    """``model`` (its parameters shared) with every Hardsigmoid replaced by the same function
    from ops torch differentiates twice (no double backward for ``hardsigmoid``)."""
    model = copy.copy(model)
    model._modules = {
        k: _Hardsigmoid() if isinstance(m, nn.Hardsigmoid) else _twice_differentiable(m)
        for k, m in model._modules.items()
    }
    return model


def hessian_diag_entries(zoo: Zoo, picks: dict[str, Tensor]) -> dict[str, Tensor]:
    """Entries ``picks[name]`` (flat indices) of the diagonal of the loss Hessian w.r.t. each
    parameter, by double backward (one Hessian-vector product per entry; attention by SDPA's
    math kernel, Hardsigmoid by ``_Hardsigmoid``: the fused kernels have no double backward)."""
    params = _params(zoo.model)
    with disable(), sdpa_kernel(SDPBackend.MATH):
        loss = nn.functional.cross_entropy(zoo.logits(_twice_differentiable(zoo.model)), zoo.y)
    grads = torch.autograd.grad(loss, [params[k] for k in picks], create_graph=True)
    out = {}
    for (name, idx), g in zip(picks.items(), grads):
        p = params[name]
        basis = torch.zeros(len(idx), p.numel(), dtype=p.dtype)
        basis[torch.arange(len(idx)), idx] = 1
        basis = basis.view(len(idx), *p.shape)
        try:
            (h,) = torch.autograd.grad(g, p, basis, retain_graph=True, is_grads_batched=True,
                                       materialize_grads=True)  # fmt: skip
        except (RuntimeError, NotImplementedError):
            h = torch.stack([torch.autograd.grad(g, p, b, retain_graph=True,
                                                 materialize_grads=True)[0] for b in basis])  # fmt: skip
        out[name] = h.flatten(1)[torch.arange(len(idx)), idx]
    return out

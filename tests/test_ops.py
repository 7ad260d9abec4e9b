"""Function calls between extended modules (``backpack.engine.ops``): every extension through
functional code, parameters outside leaf modules, tensors derived from parameters alone,
batch-merging views; calls that drop the batch axis raise; nothing outlives the graph."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backpack import backpack, extend
from backpack.custom_module.position import PositionalEmbedding
from backpack.derivatives.ops import Op
from backpack.extensions import (
    KFAC,
    KFLR,
    BatchDiagGGNExact,
    BatchDiagHessian,
    BatchGrad,
    BatchL2Grad,
    DiagGGNExact,
    DiagGGNMC,
    DiagHessian,
    SqrtGGNExact,
    SqrtGGNMC,
    SumGradSquared,
    Variance,
)
from tests.cases import DTYPE
from tests.oracles import assert_first_order_and_diagonals, ggn_block, ggn_diag, per_sample_grads

ALL = [
    BatchGrad(), BatchL2Grad(), SumGradSquared(), Variance(), DiagGGNExact(), BatchDiagGGNExact(),
    DiagHessian(), BatchDiagHessian(), DiagGGNMC(),
]  # fmt: skip


class Residual(nn.Module):
    """``h + l2(gelu(h))``, a scaled skip, ``mean`` over a middle axis, a constant product."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.out = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.l1(x).view(x.shape[0], 2, 3).transpose(1, 2).reshape(-1, 6)
        h = h + self.l2(F.gelu(h)) * 0.5
        h = torch.stack([h, torch.tanh(h)], 1).mean(1) * torch.linspace(1, 2, 6, dtype=h.dtype)
        return self.out(h)


class Attention(nn.Module):
    """Self-attention written with functions: ``chunk`` into q, k, v (several outputs), heads
    by ``view``/``transpose``, ``matmul`` and ``softmax``, rotary-like ``cat`` of slices,
    ``F.scaled_dot_product_attention``, pooling by indexing."""

    def __init__(self, d: int = 4, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj, self.head = nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, 3)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (z.view(n, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        q = torch.cat([-q[..., 1:], q[..., :1]], -1) * 0.7 + q
        a = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ v
        b = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = x + self.proj((a + b).transpose(1, 2).reshape(n, t, d))
        return self.head(h[:, 0] + h.sum(1))


class Tokens(nn.Module):
    """Parameters outside leaf modules: a class token (``expand`` + ``cat``), a position
    embedding added in place, a layer scale derived by ``reshape``, an in-place write."""

    def __init__(self, d: int = 4, t: int = 3):
        super().__init__()
        self.embed = nn.Linear(2, d)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, t + 1, d))
        self.gamma = nn.Parameter(torch.randn(d))
        self.mlp, self.head = nn.Linear(d, d), nn.Linear(d, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(x)], 1)
        h += self.pos
        h = h + self.mlp(h).mul(self.gamma.reshape(1, 1, -1))
        h[:, 1] = torch.sin(h[:, 2].clone())
        return self.head(h[:, 0])


class Positions(nn.Module):
    """Position embeddings of ids ``[1, T]`` broadcast over the batch (BERT, GPT-2), through a
    module applied to them alone (derived from derived)."""

    def __init__(self, v: int = 5, d: int = 4, t: int = 3):
        super().__init__()
        self.tok, self.pos, self.proj = nn.Embedding(v, d), nn.Embedding(t, d), nn.Linear(d, d)
        self.register_buffer("ids", torch.arange(t).unsqueeze(0))
        self.head = nn.Linear(d, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.tok(x) + self.proj(self.pos(self.ids[:, : x.shape[1]]))
        return self.head(torch.tanh(h).mean(1))


class SharedUses(nn.Module):
    """One parameter read by two calls, and an embedding's weight reused by a functional
    output layer (``h @ embed.weight.T``, weight tying without a module)."""

    def __init__(self, v: int = 5, d: int = 4):
        super().__init__()
        self.embed, self.mix = nn.Embedding(v, d), nn.Linear(d, d)
        self.scale = nn.Parameter(torch.randn(d))

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x).mean(1) * self.scale
        h = torch.tanh(self.mix(h)) + self.scale
        return h @ self.embed.weight.T


def _problem(name: str, n: int = 3):
    if name == "shared":
        torch.manual_seed(0)
        return SharedUses().to(DTYPE), torch.randint(0, 5, (n, 3))
    torch.manual_seed(0)
    if name == "positions":
        return Positions().to(DTYPE), torch.randint(0, 5, (n, 3))
    model = {"residual": Residual, "attention": Attention, "tokens": Tokens}[name]()
    shape = {"residual": (4,), "attention": (3, 4), "tokens": (3, 2)}[name]
    return model.to(DTYPE), torch.randn(n, *shape, dtype=DTYPE)


NAMES = ["residual", "attention", "tokens", "positions", "shared"]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", NAMES)
def test_every_extension_through_functions(name: str, reduction: str):
    model, x = _problem(name)
    y = torch.randint(0, 5 if name == "shared" else 3, (x.shape[0],))
    model, lossfunc = extend(model), extend(nn.CrossEntropyLoss(reduction=reduction))
    with backpack(*ALL):
        lossfunc(model(x), y).backward()
    params = dict(model.named_parameters())
    assert_first_order_and_diagonals(params, model, lossfunc, x, y)


@pytest.mark.parametrize("name", NAMES)
def test_sqrt_ggn_and_kronecker_factors(name: str):
    """The square root's outer product is the GGN block; Kronecker factors of parameters read
    by function calls are their exact block (``[G]``); an embedding tied to a functional output
    layer has no Kronecker form of the sum: it raises."""
    model, x = _problem(name)
    y = torch.randint(0, 5 if name == "shared" else 3, (x.shape[0],))
    model, lossfunc = extend(model), extend(nn.CrossEntropyLoss())
    kron = [] if name == "shared" else [KFLR(), KFAC()]
    with backpack(SqrtGGNExact(), *kron):
        lossfunc(model(x), y).backward()
    for key, p in model.named_parameters():
        root = p.sqrt_ggn_exact.flatten(0, 1).flatten(1)
        torch.testing.assert_close(root.T @ root, ggn_block(model, lossfunc, x, y, key))
        if not kron:
            continue
        assert len(p.kfac) == len(p.kflr) and all(f.dim() == 2 for f in p.kflr)
        if len(p.kflr) == 1 and key in ("cls", "pos", "gamma"):
            torch.testing.assert_close(p.kflr[0], ggn_block(model, lossfunc, x, y, key))
    if not kron:
        with pytest.raises(NotImplementedError, match=r"KFLR: parameter '\w+' of .* is tied to"):
            with backpack(KFLR()):
                lossfunc(model(x), y).backward()


class LanguageModel(nn.Module):
    """Logits ``[N, T, V]``; with ``flat`` the model itself returns ``logits.view(-1, V)``."""

    def __init__(self, flat: bool, v: int = 5, d: int = 4):
        super().__init__()
        self.flat, self.v = flat, v
        self.tok, self.mix, self.head = nn.Embedding(v, d), nn.Linear(d, d), nn.Linear(d, v)

    def forward(self, x: Tensor) -> Tensor:
        h = self.tok(x)
        h = h + torch.tanh(self.mix(h)).cumsum(1)  # tokens depend on earlier tokens
        logits = self.head(h)
        return logits.view(-1, self.v) if self.flat else logits


@pytest.mark.parametrize("flat", [True, False], ids=["view-in-model", "view-before-loss"])
def test_language_model_tokens_are_loss_samples(flat: bool):
    """``logits.view(-1, V)`` to a cross-entropy over ``N * T`` tokens: the GGN keeps the
    tokens' blocks apart (their cross terms are not in the loss Hessian); per-sample gradients
    are per sequence."""
    torch.manual_seed(0)
    n, t, v = 3, 4, 5
    model = LanguageModel(flat).to(DTYPE)
    x, y = torch.randint(0, v, (n, t)), torch.randint(0, v, (n * t,))
    lossfunc = nn.CrossEntropyLoss()
    flat_model = model if flat else nn.Sequential(model, nn.Flatten(0, 1))
    want = ggn_diag(flat_model, lossfunc, x, y)
    grads = {}
    for i in range(n):  # per sequence: its tokens' share of the mean over all tokens
        out = model(x[i : i + 1]).reshape(-1, v)
        loss = F.cross_entropy(out, y[i * t : (i + 1) * t], reduction="sum") / (n * t)
        for (k, p), g in zip(
            model.named_parameters(), torch.autograd.grad(loss, model.parameters())
        ):
            grads.setdefault(k, []).append(g)
    model, lossfunc = extend(model), extend(lossfunc)
    with backpack(BatchGrad(), DiagGGNExact()):
        out = model(x)
        lossfunc(out if flat else out.view(-1, v), y).backward()
    for key, p in model.named_parameters():
        torch.testing.assert_close(p.diag_ggn_exact, want[("" if flat else "0.") + key])
        torch.testing.assert_close(p.grad_batch, torch.stack(grads[key]))


@pytest.mark.parametrize("pick", ["last", "slice"])
def test_indexing_between_model_and_loss(pick: str):
    """``logits[:, -1]`` or ``logits[:, 1:3].flatten(0, 1)`` after the model's forward, before
    the loss: second-order quantities pass to the model's output at the picked positions."""
    torch.manual_seed(0)
    n, t, v = 3, 4, 5
    model = LanguageModel(flat=False).to(DTYPE)
    x = torch.randint(0, v, (n, t))

    def head(out: Tensor) -> Tensor:
        return out[:, -1] if pick == "last" else out[:, 1:3].flatten(0, 1)

    y = torch.randint(0, v, (n if pick == "last" else 2 * n,))
    lossfunc = nn.CrossEntropyLoss()

    class Headed(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x):
            return head(self.m(x))

    want = ggn_diag(Headed(), lossfunc, x, y)
    model, lossfunc = extend(model), extend(lossfunc)
    with backpack(DiagGGNExact()):
        lossfunc(head(model(x)), y).backward()
    for key, p in model.named_parameters():
        torch.testing.assert_close(p.diag_ggn_exact, want["m." + key])


class Mixes(nn.Module):
    """A call across the batch axis 0; with batch 4 and 4 features some keep the shape."""

    def __init__(self, how: str):
        super().__init__()
        self.how, self.l1, self.l2 = how, nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.l1(x)
        h = {
            "mean": lambda: h - h.mean(0),  # batch statistics
            "transpose": lambda: h.transpose(0, 1),  # [4, 4]: the shape alone hides it
            "t": lambda: h.t(),
            "permute": lambda: h.permute(1, 0),
            "flip": lambda: torch.flip(h, [0]),
            "softmax": lambda: torch.softmax(h, 0),
            "cumsum": lambda: h.cumsum(dim=0),
            "batch_norm": lambda: F.batch_norm(h, None, None, training=True),
        }[self.how]()
        return self.l2(h)


MIXES = ["mean", "transpose", "t", "permute", "flip", "softmax", "cumsum", "batch_norm"]


@pytest.mark.parametrize("how", MIXES)
@pytest.mark.parametrize("ext", [BatchGrad(), DiagGGNExact()], ids=repr)
def test_call_across_the_batch_axis_raises(ext, how: str):
    """Calls that mix or move the samples raise, naming the call and the extension, also where
    the batch size equals another axis's size; plain autograd is untouched."""
    model, lossfunc = extend(Mixes(how).to(DTYPE)), extend(nn.CrossEntropyLoss())
    x, y = torch.randn(4, 4, dtype=DTYPE), torch.randint(0, 3, (4,))
    with pytest.raises(NotImplementedError, match=rf"{type(ext).__name__}: the (call|module) "):
        with backpack(ext):
            lossfunc(model(x), y).backward()
    lossfunc(model(x), y).backward()  # outside a backpack block: plain autograd


class Dropouts(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.l1, self.l2 = kind, nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.l1(x))
        if self.kind == "dropout":
            h = F.dropout(h, 0.5, training=True)
        else:
            h = F.dropout1d(h.unsqueeze(-1), 0.5, training=True).squeeze(-1)
        return self.l2(h)


def test_functional_dropout_in_training_records_its_mask(monkeypatch):
    """``F.dropout`` in training mode between modules: a product with its recorded mask,
    exact for every extension (against the same model with that mask as a constant)."""
    import backpack.engine.ops as ops

    masks = []
    draw = ops._dropout_mask
    monkeypatch.setattr(
        ops, "_dropout_mask", lambda *a, **k: masks.append(draw(*a, **k)) or masks[-1]
    )
    torch.manual_seed(0)
    model = extend(Dropouts("dropout").to(DTYPE))
    lossfunc = extend(nn.CrossEntropyLoss())
    x, y = torch.randn(5, 4, dtype=DTYPE), torch.randint(0, 3, (5,))
    with backpack(BatchGrad(), DiagGGNExact()):
        lossfunc(model(x), y).backward()
    (mask,) = masks

    def fixed(x: Tensor, m: Tensor) -> Tensor:
        return model.l2(torch.relu(model.l1(x)) * m)

    params = list(model.parameters())
    rows = [
        torch.autograd.grad(
            lossfunc(fixed(x[i : i + 1], mask[i : i + 1]), y[i : i + 1]) / 5, params
        )
        for i in range(5)
    ]
    out = fixed(x, mask)
    jac = [torch.autograd.grad(o, params, retain_graph=True) for o in out.flatten()]
    hess = torch.func.hessian(lambda o: lossfunc(o, y))(out.detach()).flatten(2).flatten(0, 1)
    for j, (key, p) in enumerate(model.named_parameters()):
        torch.testing.assert_close(p.grad_batch, torch.stack([r[j] for r in rows]))
        jp = torch.stack([g[j].flatten() for g in jac])  # [out entries, P]
        want = torch.einsum("ap,ab,bp->p", jp, hess, jp).view_as(p)
        torch.testing.assert_close(p.diag_ggn_exact, want)


def test_random_calls_raise_for_second_order_only():
    model, lossfunc = extend(Dropouts("dropout1d").to(DTYPE)), extend(nn.CrossEntropyLoss())
    x, y = torch.randn(5, 4, dtype=DTYPE), torch.randint(0, 3, (5,))
    with backpack(BatchGrad()):
        lossfunc(model(x), y).backward()
    assert model.l1.weight.grad_batch.shape == (5, 6, 4)
    with pytest.raises(NotImplementedError, match=r"DiagGGNExact: the call .*dropout1d.* random"):
        with backpack(DiagGGNExact()):
            lossfunc(model(x), y).backward()


class SequenceFirst(nn.Module):
    """An LSTM with the batch on axis 1, its last step taken by indexing."""

    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.LSTM(3, 4), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.rnn(x)[0][-1]))


def test_batch_size_from_a_sequence_first_layer():
    """The batch size comes from the first layer whose batch axis is not 0: indexing the last
    step of ``[T, N, H]`` keeps the samples."""
    torch.manual_seed(0)
    model = SequenceFirst().to(DTYPE)
    x, y = torch.randn(6, 4, 3, dtype=DTYPE), torch.randint(0, 3, (4,))
    lossfunc = nn.CrossEntropyLoss()
    grads = {}
    for i in range(4):
        loss = lossfunc(model(x[:, i : i + 1]), y[i : i + 1]) / 4
        for (k, _), g in zip(
            model.named_parameters(), torch.autograd.grad(loss, model.parameters())
        ):
            grads.setdefault(k, []).append(g)
    model, lossfunc = extend(model), extend(lossfunc)
    with backpack(BatchGrad(), DiagGGNExact()):
        lossfunc(model(x), y).backward()
    want = ggn_diag(model, lossfunc, x, y)
    for key, p in model.named_parameters():
        torch.testing.assert_close(p.grad_batch, torch.stack(grads[key]))
        torch.testing.assert_close(p.diag_ggn_exact, want[key])


def test_first_order_without_second_order_cost():
    """First-order extensions on a model with function calls: per-sample gradients of a model
    whose function calls read no parameters equal the oracle (the calls run no rule)."""
    model, x = _problem("attention")
    y = torch.randint(0, 3, (x.shape[0],))
    want = per_sample_grads(model, nn.CrossEntropyLoss(), x, y)
    model, lossfunc = extend(model), extend(nn.CrossEntropyLoss())
    with backpack(BatchGrad()):
        lossfunc(model(x), y).backward()
    for key, p in model.named_parameters():
        torch.testing.assert_close(p.grad_batch, want[key])


def _ops_alive() -> int:
    gc.collect()
    return sum(type(o) is Op for o in gc.get_objects())


def test_records_of_calls_live_as_long_as_the_graph():
    """Recorded calls are freed with their graph: after backward, and for a forward pass that
    is never differentiated; none are made inside torch.no_grad or outside the model."""
    model, x = _problem("tokens")
    y = torch.randint(0, 3, (x.shape[0],))
    model, lossfunc = extend(model), extend(nn.CrossEntropyLoss())
    before = _ops_alive()
    out = model(x)
    assert _ops_alive() > before
    refs = [weakref.ref(o) for o in gc.get_objects() if type(o) is Op]
    del out
    assert _ops_alive() == before and all(r() is None for r in refs)
    for _ in range(3):
        with backpack(DiagGGNExact()):
            lossfunc(model(x), y).backward()
    assert _ops_alive() == before
    with torch.no_grad():
        model(x)
    torch.tanh(x).sum()  # outside the model's forward: not recorded
    assert _ops_alive() == before


class FinalState(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.GRU(3, 4, batch_first=True), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        out, h = self.rnn(x)
        return self.head(torch.cat([out[:, -1], h[0]], 1))


def test_second_output_of_a_module_raises_for_second_order():
    """The rules pass second-order quantities for a module's first output only: a GRU's final
    state feeding the loss raises (never a wrong number); first order is exact."""
    model = FinalState().to(DTYPE)
    x, y = torch.randn(4, 5, 3, dtype=DTYPE), torch.randint(0, 3, (4,))
    want = per_sample_grads(model, nn.CrossEntropyLoss(), x, y)
    model, lossfunc = extend(model), extend(nn.CrossEntropyLoss())
    with backpack(BatchGrad()):
        lossfunc(model(x), y).backward()
    for key, p in model.named_parameters():
        torch.testing.assert_close(p.grad_batch, want[key])
    with pytest.raises(NotImplementedError, match=r"DiagGGNExact: output 1 of GRU"):
        with backpack(DiagGGNExact()):
            lossfunc(model(x), y).backward()


@pytest.mark.parametrize("flat", [True, False], ids=["view-in-model", "view-before-loss"])
def test_language_model_monte_carlo_sums_the_tokens_draws(flat: bool):
    """Monte-Carlo columns through ``logits.view(-1, V)``: one column per sample (the tokens'
    independent draws summed, unbiased), not one per token; the mean over many draws
    converges to the exact GGN diagonal."""
    torch.manual_seed(0)
    n, t, v = 2, 3, 4
    model = LanguageModel(flat, v=v).to(DTYPE)
    x, y = torch.randint(0, v, (n, t)), torch.randint(0, v, (n * t,))
    model, lossfunc = extend(model), extend(nn.CrossEntropyLoss())

    def run(ext):
        out = model(x)
        with backpack(ext):
            lossfunc(out if flat else out.view(-1, v), y).backward()

    run(DiagGGNExact())
    run(SqrtGGNMC(mc_samples=2))
    assert model.head.weight.sqrt_ggn_mc.shape == (2, n, v, 4)
    run(DiagGGNMC(mc_samples=20000))
    for key, p in model.named_parameters():
        scale = p.diag_ggn_exact.abs().max()
        torch.testing.assert_close(p.diag_ggn_mc, p.diag_ggn_exact, atol=0.05 * scale, rtol=0.1)


class AddedPositions(nn.Module):
    """``x + pos`` with ``pos [1, P, D]`` a parameter (a ViT's position embedding), or the same
    through backpack's ``PositionalEmbedding`` layer."""

    def __init__(self, p: int, d: int, layer: bool = False):
        super().__init__()
        self.embed, self.head = nn.Linear(2, d), nn.Linear(d, 3)
        self.layer = PositionalEmbedding(p, d) if layer else None
        self.pos = nn.Parameter(torch.randn(1, p, d)) if not layer else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        h = self.layer(h) if self.layer is not None else h + self.pos
        return self.head(torch.tanh(h).mean(1))


@pytest.mark.parametrize("ext", [KFLR, KFAC])
def test_added_position_embedding_has_kronecker_factors(ext):
    """``[A, G]`` (rows: positions) equal to those of the same parameter in backpack's
    ``PositionalEmbedding`` layer; also where the exact block would be too large (5120
    entries)."""
    torch.manual_seed(0)
    x, y = torch.randn(4, 80, 2, dtype=DTYPE), torch.randint(0, 3, (4,))
    torch.manual_seed(1)
    added = extend(AddedPositions(80, 64).to(DTYPE))
    torch.manual_seed(1)
    layer = extend(AddedPositions(80, 64, layer=True).to(DTYPE))
    layer.layer.weight.data = added.pos.data[0].clone()
    lossfunc = extend(nn.CrossEntropyLoss())
    for model in (added, layer):
        torch.manual_seed(2)  # KFAC's samples
        with backpack(ext()):
            lossfunc(model(x), y).backward()
    got, want = getattr(added.pos, ext().savefield), getattr(layer.layer.weight, ext().savefield)
    assert [f.shape for f in got] == [(80, 80), (64, 64)]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_torch_transformer_encoder_without_the_converter(norm_first: bool):
    """``nn.TransformerEncoder`` with plain ``extend``: its residuals and activation are
    function calls between its modules (the converter used to be needed)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        4, 2, 8, dropout=0.0, batch_first=True, norm_first=norm_first, activation="gelu"
    )
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    model = nn.Sequential(encoder, nn.Flatten(), nn.Linear(12, 3)).to(DTYPE).eval()
    x, y = torch.randn(3, 3, 4, dtype=DTYPE), torch.randint(0, 3, (3,))
    model, lossfunc = extend(model), extend(nn.CrossEntropyLoss())
    with backpack(*ALL):
        lossfunc(model(x), y).backward()
    assert_first_order_and_diagonals(dict(model.named_parameters()), model, lossfunc, x, y)

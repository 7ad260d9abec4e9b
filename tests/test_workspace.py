"""backpack.utils.workspace: kept buffers are reused only once nothing uses them, stay bounded,
and leave every extension's numbers unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backpack import backpack, extend
from backpack.extensions import (
    HMP,
    KFAC,
    KFLR,
    BatchGrad,
    DiagGGNExact,
    DiagHessian,
    SqrtGGNExact,
    SumGradSquared,
)
from backpack.utils import workspace


@pytest.fixture
def pooled(monkeypatch):
    """Every CPU tensor the streams ask for goes through the pool, chunked results in chunks
    of a few entries."""
    monkeypatch.setattr(workspace, "MIN_BYTES", 0)
    monkeypatch.setattr(workspace, "CHUNK_BYTES", 1024)
    workspace.clear()
    yield
    workspace.clear()


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_a_buffer_is_reused_only_when_nothing_uses_it(pooled):
    like = torch.zeros(1)
    first = workspace.empty((4, 5), like)
    view = first[1:]
    second = workspace.empty((20,), like)  # same size, but first is alive
    assert _ptr(second) != _ptr(first)
    del first
    third = workspace.empty((2, 10), like)  # the view still holds the first buffer
    assert _ptr(third) not in {_ptr(view), _ptr(second)}
    del view, second
    fourth = workspace.empty((5, 4), like)
    assert fourth.shape == (5, 4) and fourth.dtype == like.dtype


def test_chunked_writes_each_chunk_into_a_kept_buffer(pooled):
    x = torch.randn(50, 3, 4)
    out = workspace.chunked(lambda t: t.flip(-1).cumsum(1), x, (50, 3, 4))
    torch.testing.assert_close(out, x.flip(-1).cumsum(1))
    assert any(b[0].data_ptr() == _ptr(out) for b in workspace._BUFFERS)


def test_small_cuda_and_wrapped_tensors_are_plain(monkeypatch):
    workspace.clear()
    small = workspace.empty((3,), torch.zeros(1))
    assert small.shape == (3,) and not workspace._BUFFERS
    monkeypatch.setattr(workspace, "MIN_BYTES", 0)
    wrapped = torch.func.vmap(lambda t: workspace.empty((2,), t).zero_() + t)(torch.ones(3, 1))
    assert wrapped.shape == (3, 2) and not workspace._BUFFERS


def _passes(sizes_per_pass: list[tuple[int, ...]]) -> list[int]:
    """One backward pass per entry, asking for buffers of these sizes; the sizes kept after."""
    x = torch.zeros(1, requires_grad=True)
    for sizes in sizes_per_pass:

        def ask(g: torch.Tensor, sizes: tuple[int, ...] = sizes) -> torch.Tensor:
            return g + sum(workspace.empty((s,), g).zero_().sum() for s in sizes)

        y = x * 1
        y.register_hook(ask)
        y.sum().backward()
    return sorted(b[0].nbytes() // 4 for b in workspace._BUFFERS)


def test_buffers_the_last_passes_did_not_use_are_dropped(pooled, monkeypatch):
    """Only what the last ``KEEP_PASSES`` passes used is kept, whether or not new buffers are
    made."""
    monkeypatch.setattr(workspace, "KEEP_PASSES", 3)
    assert _passes([(size,) for size in range(10, 20)]) == [17, 18, 19]
    workspace.clear()
    assert _passes([(10, 11), (11,), (11,)]) == [10, 11]
    assert _passes([(11,)]) == [11]


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(3, 4, 2), nn.Sigmoid(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4, 3),
    )  # fmt: skip


def _run(exts, steps: int = 3) -> list[dict]:
    torch.manual_seed(0)
    model, lossfunc = extend(_net().double()), extend(nn.CrossEntropyLoss())
    results = []
    for step in range(steps):
        x, y = torch.randn(5, 2, 8, 8, dtype=torch.float64), torch.randint(0, 3, (5,))
        model.zero_grad()
        with backpack(*(e() for e in exts)):
            lossfunc(model(x), y).backward()
        values = {}
        for name, p in model.named_parameters():
            for ext in exts:
                field = ext().savefield
                value = getattr(p, field)
                if callable(value):
                    value = value(torch.ones(1, *p.shape, dtype=p.dtype))
                values[(name, field)] = value
        results.append(values)
    return results


EXTS = [BatchGrad, SumGradSquared, DiagGGNExact, DiagHessian, SqrtGGNExact, KFAC, KFLR, HMP]


def test_pooled_memory_gives_the_same_numbers_step_after_step(pooled):
    """With every tensor pooled (kept buffers reused inside and across backward passes) all
    extensions give what plain allocations give, and the pool stops growing."""
    got = _run(EXTS)
    kept = len(workspace._BUFFERS)
    assert kept > 0
    _run(EXTS, steps=2)
    assert len(workspace._BUFFERS) <= kept
    workspace.MIN_BYTES = 1 << 60  # restored by monkeypatch
    plain = _run(EXTS)
    for mine, ref in zip(got, plain):
        for key, value in ref.items():
            if isinstance(value, list):
                for a, b in zip(mine[key], value):
                    torch.testing.assert_close(a, b)
            else:
                torch.testing.assert_close(mine[key], value)

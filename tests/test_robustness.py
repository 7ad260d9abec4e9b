"""Robustness: autocast, bfloat16 models, empty batches, threads, torch.compile, numpy."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from backpack import backpack, extend
from backpack.extensions import KFLR, BatchGrad, DiagGGNExact, DiagGGNMC, SqrtGGNExact
from tests.oracles import ggn_diag, per_sample_grads


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.Tanh(),
        nn.Linear(8, 3),
    )  # fmt: skip


def _data(model: nn.Module, n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (n, 6) if isinstance(model[0], nn.Linear) else (n, 2, 6, 6)
    return torch.randn(shape), torch.randint(0, 3, (n,))


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """Entrywise within ``rel`` times the largest entry (low-precision round-off)."""
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, atol=rel * expected.abs().max(), rtol=0)


@pytest.mark.parametrize("make", [_mlp, _cnn], ids=["mlp", "cnn"])
def test_autocast_bfloat16_forward(make):
    """Under CPU autocast (bf16 forward) the quantities are float32 (the parameters' dtype) and
    match oracles run under the same autocast."""
    torch.manual_seed(0)
    model, lossfunc = extend(make()), extend(nn.CrossEntropyLoss())
    x, y = _data(model)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    with autocast:
        out = model(x)
        loss = lossfunc(out, y)
    assert out.dtype == torch.bfloat16
    with backpack(BatchGrad(), DiagGGNExact(), SqrtGGNExact(), KFLR()):
        loss.backward()
    with autocast:
        grads, diags = per_sample_grads(model, lossfunc, x, y), ggn_diag(model, lossfunc, x, y)
    for name, p in model.named_parameters():
        _close(p.grad_batch, grads[name].float(), 0.05)
        _close(p.grad_batch.sum(0), p.grad, 0.05)
        _close(p.diag_ggn_exact, diags[name].float(), 0.05)
        _close(p.sqrt_ggn_exact.square().sum((0, 1)), p.diag_ggn_exact, 1e-4)
        assert all(f.dtype == torch.float32 for f in p.kflr)


def test_bfloat16_model_no_false_regulariser_warning():
    """bf16 round-off (autograd and the path gradient sum in different orders) is no
    "gradient from outside" warning; a real regulariser still warns."""
    torch.manual_seed(0)
    model, lossfunc = extend(_cnn().bfloat16()), extend(nn.CrossEntropyLoss())
    x, y = _data(model, 64)
    x = x.bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with backpack(DiagGGNExact()):
            lossfunc(model(x), y).backward()
    diags = ggn_diag(model.float(), lossfunc, x.float(), y)
    for name, p in model.named_parameters():
        assert p.diag_ggn_exact.dtype == torch.bfloat16
        _close(p.diag_ggn_exact.float(), diags[name], 0.05)
    model.bfloat16()
    with pytest.warns(UserWarning, match="gradient from outside"):
        with backpack(DiagGGNExact()):
            (lossfunc(model(x), y) + model[0].bias.square().sum()).backward()


@pytest.mark.parametrize("ext", [BatchGrad(), DiagGGNMC()], ids=repr)
def test_empty_batch_raises(ext):
    model, lossfunc = extend(_mlp()), extend(nn.CrossEntropyLoss(reduction="sum"))
    x, y = _data(model, 0)
    loss = lossfunc(model(x), y)
    with pytest.raises(ValueError, match=rf"{type(ext).__name__}: .* empty batch"):
        with backpack(ext):
            loss.backward()


def _train(model: nn.Module, ext, x, y, barrier: threading.Barrier, steps: int) -> None:
    lossfunc = extend(nn.CrossEntropyLoss())
    for _ in range(steps):
        loss = lossfunc(model(x), y)
        barrier.wait()  # both threads inside their blocks at once
        with backpack(ext):
            loss.backward()
        model.zero_grad()


def test_two_threads_with_own_blocks():
    """Two threads, each its own model and block, concurrently: each gets its own quantities."""
    torch.manual_seed(0)
    models = [extend(_mlp().double()) for _ in range(2)]
    exts = [BatchGrad(), DiagGGNExact()]
    x, y = _data(models[0], 4)
    x = x.double()
    barrier, errors = threading.Barrier(2), []

    def work(i: int) -> None:
        try:
            _train(models[i], exts[i], x, y, barrier, 20)
        except BaseException as e:  # a test thread must report, not swallow
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    lossfunc = nn.CrossEntropyLoss()
    grads, diags = per_sample_grads(models[0], lossfunc, x, y), ggn_diag(models[1], lossfunc, x, y)
    for (name, p0), (_, p1) in zip(models[0].named_parameters(), models[1].named_parameters()):
        torch.testing.assert_close(p0.grad_batch, grads[name])
        torch.testing.assert_close(p1.diag_ggn_exact, diags[name])
        assert not hasattr(p0, "diag_ggn_exact") and not hasattr(p1, "grad_batch")


def test_backward_on_another_thread_uses_the_forward_threads_block():
    """Autograd runs the hooks of CUDA tensors on its device threads: they see the block of
    the thread that ran the forward pass (simulated by a backward call on another thread)."""
    torch.manual_seed(0)
    model, lossfunc = extend(_mlp().double()), extend(nn.CrossEntropyLoss())
    x, y = _data(model)
    x = x.double()
    loss = lossfunc(model(x), y)
    with backpack(BatchGrad(), DiagGGNExact()):
        worker = threading.Thread(target=loss.backward)
        worker.start()
        worker.join()
    grads, diags = per_sample_grads(model, lossfunc, x, y), ggn_diag(model, lossfunc, x, y)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad_batch, grads[name])
        torch.testing.assert_close(p.diag_ggn_exact, diags[name])


def test_torch_compile_of_extended_model():
    """``torch.compile(model)``: the hooks record eagerly between the compiled pieces (graph
    breaks), so every quantity is computed, in every step."""
    torch.manual_seed(0)
    model, lossfunc = extend(_mlp().double()), extend(nn.CrossEntropyLoss())
    compiled = torch.compile(model)
    x, y = _data(model)
    x = x.double()
    grads, diags = per_sample_grads(model, lossfunc, x, y), ggn_diag(model, lossfunc, x, y)
    for _ in range(2):
        with backpack(BatchGrad(), DiagGGNExact()):
            lossfunc(compiled(x), y).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad_batch, grads[name])
            torch.testing.assert_close(p.diag_ggn_exact, diags[name])
            del p.grad_batch, p.diag_ggn_exact


def test_import_without_warnings_and_numpy_declared():
    """torch warns on import when numpy is missing ("Failed to initialize NumPy"): numpy is a
    declared dependency, and importing backpack warns about nothing."""
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[(.*?)\]", pyproject, re.M).group(1)
    assert '"numpy' in deps
    code = "import warnings; warnings.simplefilter('error', UserWarning); import backpack"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])

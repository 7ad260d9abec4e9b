"""HMP, GGNMP and PCHMP through several curved layers, branches and one-vector inputs: the
elementwise residuals applied lazily (``backpack.extensions.secondorder.lazy``) against dense
float64 blocks; what the products keep is linear in the activations."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import weakref
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from backpack import backpack, extend
from backpack.extensions import GGNMP, HMP, PCHMP
from tests.oracles import ggn_block
from tests.oracles import hessian_block as full_hessian_block
from tests.test_curvmatprod import hessian_block

EXTS = [HMP(), GGNMP(), PCHMP(modify="clip"), PCHMP(savefield="pchmp_abs", modify="abs")]


def _conv_net() -> nn.Module:
    """Curved layers behind curved layers, Conv and Linear, ReLU among them."""
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Sigmoid(), nn.Conv2d(2, 2, 2), nn.Tanh(), nn.Flatten(),
        nn.Linear(18, 5), nn.ReLU(), nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 3),
    )  # fmt: skip


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Sigmoid(), nn.Linear(5, 3), nn.ELU()
    )


class _Branches(nn.Module):
    """One tensor feeding two curved layers whose outputs meet again, and a residual
    connection around a curved layer: the products need the cross terms between the paths."""

    def __init__(self):
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        h = torch.sigmoid(h) * 2 + torch.tanh(h)
        return self.out(h + torch.sigmoid(self.mid(h)))


def _run(model: nn.Module, loss: str, n: int = 3, converter: bool = False):
    torch.manual_seed(0)
    model = model.double()
    conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
    x = torch.randn(n, 1, 6, 6) if conv else torch.randn(n, 4)
    x = x.double()
    if loss == "ce":
        lossfunc, y = nn.CrossEntropyLoss(), torch.randint(0, 3, (n,))
    else:
        lossfunc, y = nn.MSELoss(reduction="sum"), torch.randn(n, 3, dtype=torch.float64)
    extended = extend(model, use_converter=converter)
    with backpack(*EXTS):
        extend(lossfunc)(extended(x), y).backward()
    return model, lossfunc, x, y


def _mat(p: Tensor, v: int | None, seed: int = 1) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = p.shape if v is None else (v, *p.shape)
    return torch.randn(*shape, generator=gen, dtype=p.dtype)


def _product(block: Tensor, mat: Tensor, shape: torch.Size) -> Tensor:
    return (mat.reshape(-1, shape.numel()) @ block).reshape(mat.shape)


@pytest.mark.parametrize("v", [None, 1, 3], ids=["[*P]", "[1,*P]", "[3,*P]"])
@pytest.mark.parametrize(
    "make, loss", [(_conv_net, "ce"), (_conv_net, "mse"), (_mlp, "mse"), (_mlp, "ce")]
)
def test_chains_of_curved_layers_match_dense_blocks(make, loss, v):
    """``[*P] -> [*P]`` and ``[V, *P] -> [V, *P]`` equal the dense blocks: Hessian (autograd),
    GGN (explicit Jacobians), positive-curvature Hessian (residual diagonals clipped or made
    absolute)."""
    model, lossfunc, x, y = _run(make(), loss)
    for name, p in model.named_parameters():
        mat = _mat(p, v)
        blocks = {
            "hmp": full_hessian_block(model, lossfunc, x, y, name),
            "ggnmp": ggn_block(model, lossfunc, x, y, name),
            "pchmp": hessian_block(model, lossfunc, x, y, name, lambda r: r.clamp(min=0)),
            "pchmp_abs": hessian_block(model, lossfunc, x, y, name, torch.abs),
        }
        for field, block in blocks.items():
            result = getattr(p, field)(mat)
            assert result.shape == mat.shape and not result.requires_grad
            torch.testing.assert_close(result, _product(block, mat, p.shape), msg=field)


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_branches_meeting_again_match_dense_blocks(loss):
    """Through the converter: forks into curved layers and a residual sum; HMP is the Hessian
    block with the paths' cross terms, GGNMP the GGN block."""
    model, lossfunc, x, y = _run(_Branches(), loss, converter=True)
    for name, p in model.named_parameters():
        for v in (None, 2):
            mat = _mat(p, v)
            hess = full_hessian_block(model, lossfunc, x, y, name)
            torch.testing.assert_close(p.hmp(mat), _product(hess, mat, p.shape))
            ggn = ggn_block(model, lossfunc, x, y, name)
            torch.testing.assert_close(p.ggnmp(mat), _product(ggn, mat, p.shape))


@pytest.mark.parametrize("field", ["hmp", "ggnmp", "pchmp"])
def test_wrong_shapes_raise(field):
    model, *_ = _run(_mlp(), "ce")
    weight, bias = model[0].weight, model[0].bias  # [5, 4], [5]
    for p, bad in (
        (weight, torch.zeros(4, 5)),
        (weight, torch.zeros(20)),
        (weight, torch.zeros(2, 3, 5, 4)),
        (bias, torch.zeros(5, 5, 1)),
        (bias, torch.zeros(4)),
        (bias, torch.zeros(())),
    ):
        with pytest.raises(ValueError, match=rf"'{field}'.*'weight|bias'.*\[\*P\].*got"):
            getattr(p, field)(bad.double())
    with pytest.raises(ValueError, match="got list"):
        getattr(bias, field)([0.0] * 5)
    assert getattr(bias, field)(torch.zeros(5, dtype=torch.float64)).shape == (5,)
    assert getattr(bias, field)(torch.zeros(7, 5, dtype=torch.float64)).shape == (7, 5)


def _tensors(obj, seen: set, found: dict) -> None:
    """Every tensor reachable from a product: closures, bound methods, containers, records
    and dataclasses (not modules: their parameters are the model's own)."""
    stack = [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen or isinstance(o, nn.Module):
            continue
        seen.add(id(o))
        if isinstance(o, Tensor):
            found[o.untyped_storage().data_ptr()] = o.untyped_storage().nbytes()
        elif callable(o) and hasattr(o, "__closure__"):
            stack += [c.cell_contents for c in o.__closure__ or () if _filled(c)]
        elif hasattr(o, "__func__"):
            stack += [o.__func__, o.__self__]
        elif isinstance(o, dict):
            stack += list(o.values())
        elif isinstance(o, (list, tuple)):
            stack += list(o)
        elif is_dataclass(o) or hasattr(o, "__slots__"):
            names = [f.name for f in fields(o)] if is_dataclass(o) else o.__slots__
            stack += [getattr(o, k) for k in names if hasattr(o, k)]


def _filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def test_products_keep_memory_linear_in_the_activations():
    """The sigmoid CNN of issue #15 at batch 8: what all products keep (records, the loss's
    root, residual diagonals) is linear in the activations, no ``[D, D]`` per-sample block
    (the dense residual factors behind the first sigmoid alone were 5408 columns of 8 x 784
    at the input)."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from hmp_memory import model as cnn

    torch.manual_seed(0)
    net, lossfunc = extend(cnn()), extend(nn.CrossEntropyLoss())
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    acts = [x]
    hooks = [m.register_forward_hook(lambda m, i, o: acts.append(o)) for m in net]
    with backpack(HMP(), PCHMP()):
        lossfunc(net(x), y).backward()
    for h in hooks:
        h.remove()
    sizes = [a.untyped_storage().nbytes() for a in acts]
    found: dict = {}
    for p in net.parameters():
        _tensors([p.hmp, p.pchmp], set(), found)
    # the loss's root: 9 columns per activation, one copy per product (2 extensions x 2
    # parameters of a module); records and residual diagonals: the activations
    assert max(found.values()) <= 9 * max(sizes)
    assert sum(found.values()) <= 2 * 2 * 9 * sum(sizes)
    for p in net.parameters():
        assert p.hmp(torch.ones(2, *p.shape)).shape == (2, *p.shape)


def test_products_free_the_model():
    """The stored products form no cycle through autograd: the model goes with its last
    reference."""
    model, *_ = _run(_conv_net(), "ce")
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_peak_memory_and_newton_cg_bounded():
    """One HMP backward, then a few Newton-CG steps (CG on each parameter's block), on the
    sigmoid CNN at batch 2, in a fresh process: the peak stays far below the dense per-sample
    blocks' gigabytes (measured 3.2 GB before the lazy residuals)."""
    script = Path(__file__).parents[1] / "benchmarks" / "hmp_memory.py"
    argv = ["--child", "--batch", "2", "--cg-steps", "3", "--newton-steps", "2", "--threads", "1"]
    root = str(Path(__file__).parents[1])
    env = {"PYTHONPATH": root, "PATH": ""}
    out = subprocess.run(
        [sys.executable, str(script), *argv], capture_output=True, text=True, check=True, env=env
    )
    assert json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"] < 300

"""Time of each extension as a ratio to a plain forward+backward pass on the same problem.

Every variant (plain, extended but idle, one extension each, torch.func per-sample gradients)
runs once per repetition in a rotating order, interleaved in one process, after a warm-up; the
table shows medians. A variant that fails prints ``n/a`` with a footnote giving the error.

    python benchmarks/benchmark.py [--reps 20] [--extensions BatchGrad,Variance | all]
        [--problems mlp,mlp-sigmoid,3c3d-64,3c3d-128,3c3d-sigmoid-128,resnet,vit,gpt,
                    autoencoder]
        [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from backpack import backpack, extend
from backpack.extensions import (
    KFAC,
    KFLR,
    BatchDiagGGNExact,
    BatchDiagGGNMC,
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the vit/gpt rows use tests.models

# name -> constructor; one line per extension. DEFAULT: those run without --extensions.
EXTENSIONS: dict[str, Callable] = {
    "BatchGrad": BatchGrad,
    "BatchL2Grad": BatchL2Grad,
    "SumGradSquared": SumGradSquared,
    "Variance": Variance,
    "DiagGGNExact": DiagGGNExact,
    "DiagGGNMC": DiagGGNMC,
    "BatchDiagGGNExact": BatchDiagGGNExact,
    "BatchDiagGGNMC": BatchDiagGGNMC,
    "DiagHessian": DiagHessian,
    "KFAC": KFAC,
    "KFLR": KFLR,
    # KFRA is left out: its dense [D, D] blocks over a conv activation (D ~ 50k) do not fit
    "BatchDiagHessian": BatchDiagHessian,
    "SqrtGGNExact": SqrtGGNExact,
    "SqrtGGNMC": SqrtGGNMC,
}
DEFAULT = ["BatchGrad", "BatchL2Grad", "SumGradSquared", "Variance"]


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))


def mlp_sigmoid() -> nn.Module:
    """784-64-64-10 with sigmoids: curved activations, for DiagHessian's residual terms."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 64), nn.Sigmoid(), nn.Linear(64, 64), nn.Sigmoid(),
        nn.Linear(64, 10),
    )  # fmt: skip


def cnn_3c3d(act: type[nn.Module] = nn.ReLU) -> nn.Module:
    """The 3C3D CIFAR-10 network (DeepOBS): three conv-act-pool blocks, three dense layers."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 5), act(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 96, 3), act(), nn.MaxPool2d(3, 2),
        nn.Conv2d(96, 128, 3, padding=1), act(), nn.MaxPool2d(3, 2),
        nn.Flatten(),
        nn.Linear(128 * 2 * 2, 512), act(),
        nn.Linear(512, 256), act(),
        nn.Linear(256, 10),
    )  # fmt: skip


class _ResBlock(nn.Module):
    """ResNet basic block (eval-mode BatchNorm, in-place ReLU, ``out += identity``)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out),
        )  # fmt: skip
        self.down = nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        out += self.down(x)
        return self.relu(out)


def resnet() -> nn.Module:
    """A small CIFAR ResNet: stem, three basic blocks (16-32-64 channels), pool, linear head.
    Extended with ``use_converter=True`` (residual additions need the converter)."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        _ResBlock(16, 16, 1), _ResBlock(16, 32, 2), _ResBlock(32, 64, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    ).eval()  # fmt: skip


def vit() -> nn.Module:
    """ViT-style classifier (tests/models.py): 32x32 images in 4x4 patches (64 tokens), E=64,
    2 pre-norm encoder layers with 4 heads, mean over tokens, 10 classes."""
    from tests.models import ViT

    return ViT(image=32, channels=3, patch=4, dim=64, heads=4, layers=2, classes=10).eval()


def gpt() -> nn.Module:
    """GPT-style language model (tests/models.py): 32 tokens of a 64-word vocabulary, E=64,
    2 causal pre-norm encoder layers with 4 heads; logits ``[n, 64, 32]``."""
    from tests.models import GPT

    return GPT(vocab=64, length=32, dim=64, heads=4, layers=2).eval()


def autoencoder() -> nn.Module:
    """MSE autoencoder on 28x28 images (the original's retain-graph example): Conv2d encoder
    to 7x7, ConvTranspose2d decoder back to 28x28; DiagGGNExact flows D = 784 columns."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(32, 16, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),
        nn.ConvTranspose2d(16, 1, 3, stride=2, padding=1, output_padding=1), nn.Sigmoid(),
        nn.Flatten(),
    )  # fmt: skip


Data = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


def images(*shape: int) -> Data:
    """Batches of ``n`` random inputs ``[n, *shape]`` with one of 10 classes each."""
    return lambda n: (torch.randn(n, *shape), torch.randint(0, 10, (n,)))


def reconstruction(*shape: int) -> Data:
    """Batches of ``n`` random images ``[n, *shape]``, each its own (flattened) target."""

    def data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.rand(n, *shape)
        return x, x.flatten(1)

    return data


def tokens(length: int, vocab: int) -> Data:
    """Batches of ``n`` random sequences ``[n, length]``, next-token targets at every position."""
    return lambda n: tuple(torch.randint(0, vocab, (n, length)) for _ in range(2))


# name -> (model, data, batch size)
PROBLEMS: dict[str, tuple[Callable[[], nn.Module], Data, int]] = {
    "mlp": (mlp, images(1, 28, 28), 128),
    "mlp-sigmoid": (mlp_sigmoid, images(1, 28, 28), 128),
    "3c3d-64": (cnn_3c3d, images(3, 32, 32), 64),
    "3c3d-128": (cnn_3c3d, images(3, 32, 32), 128),
    "3c3d-sigmoid-128": (lambda: cnn_3c3d(nn.Sigmoid), images(3, 32, 32), 128),
    "resnet": (resnet, images(3, 32, 32), 64),
    "vit": (vit, images(3, 32, 32), 32),
    "gpt": (gpt, tokens(32, 64), 32),
    "autoencoder": (autoencoder, reconstruction(1, 28, 28), 32),
}
# problems extended with extend(..., use_converter=True)
CONVERTED = {"resnet", "vit", "gpt"}
# problems with a loss other than cross-entropy
LOSSES: dict[str, Callable[[], nn.Module]] = {"autoencoder": nn.MSELoss}


def variants(problem: str, extensions: list[str]) -> dict[str, Callable[[], None]]:
    """name -> one zero-grad + forward + backward step of that variant on ``problem``."""
    make, data, n = PROBLEMS[problem]
    torch.manual_seed(0)
    loss_type = LOSSES.get(problem, nn.CrossEntropyLoss)
    model, lossfunc = make(), loss_type()
    x, y = data(n)
    # same weights; `model` itself stays unhooked
    ext_model = extend(copy.deepcopy(model), use_converter=problem in CONVERTED)
    ext_loss = extend(loss_type())

    def step(net: nn.Module, loss: nn.Module, *exts: Callable) -> Callable[[], None]:
        def run() -> None:
            net.zero_grad(set_to_none=True)
            value = loss(net(x), y)
            if exts:
                with backpack(*(e() for e in exts), strict=True):  # a missing rule raises
                    value.backward()
            else:
                value.backward()

        return run

    params = {k: p.detach() for k, p in model.named_parameters()}

    def sample_loss(p: dict, xn: torch.Tensor, yn: torch.Tensor) -> torch.Tensor:
        return lossfunc(functional_call(model, p, (xn.unsqueeze(0),)), yn.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    return {
        "plain": step(model, lossfunc),
        "extended, idle": step(ext_model, ext_loss),
        **{name: step(ext_model, ext_loss, EXTENSIONS[name]) for name in extensions},
        "vmap(grad)": lambda: per_sample(params, x, y),
    }


def measure(steps: dict[str, Callable[[], None]], reps: int, warmup: int = 2):
    """Median seconds per variant, or the exception it raised (then it is not timed again)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    failed: dict[str, Exception] = {}
    for name, run in steps.items():
        try:
            for _ in range(warmup):
                run()
        except Exception as err:  # noqa: BLE001 (report any failure as n/a, keep going)
            failed[name] = err
    names = [name for name in steps if name not in failed]
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    result = {name: statistics.median(t) for name, t in times.items() if t}
    return {**result, **failed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions per variant")
    parser.add_argument("--problems", default="mlp,3c3d-64,3c3d-128", help="comma-separated")
    parser.add_argument("--extensions", default=",".join(DEFAULT), help="comma-separated, or all")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    problems = args.problems.split(",")
    extensions = list(EXTENSIONS) if args.extensions == "all" else args.extensions.split(",")
    for name in problems + extensions:
        if name not in PROBLEMS and name not in EXTENSIONS:
            parser.error(f"unknown problem or extension {name!r}")

    results = {}
    for problem in problems:
        results[problem] = measure(variants(problem, extensions), args.reps)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"median of {args.reps} interleaved repetitions; ratio to plain forward+backward"
    )
    rows = list(next(iter(results.values())))
    notes: list[str] = []
    width = max(map(len, rows)) + 2
    print("".join([f"{'variant':<{width}}", *(f"{p:>14}" for p in problems)]))
    for row in rows:
        cells = []
        for problem in problems:
            value, plain = results[problem][row], results[problem]["plain"]
            if isinstance(value, Exception):
                notes.append(
                    f"[{len(notes) + 1}] {problem} / {row}: "
                    f"{type(value).__name__}: {str(value).splitlines()[0][:200]}"
                )
                cells.append(f"n/a [{len(notes)}]")
            elif row == "plain":
                cells.append(f"{1e3 * value:.1f} ms")
            elif isinstance(plain, Exception):
                cells.append(f"{1e3 * value:.1f} ms")
            else:
                cells.append(f"{value / plain:.2f}x")
        print("".join([f"{row:<{width}}", *(f"{c:>14}" for c in cells)]))
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()

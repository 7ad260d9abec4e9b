"""Time of each extension as a ratio to a plain forward+backward pass on the same problem.

Every variant (plain, extended but idle, one extension each, torch.func per-sample gradients,
Opacus per-sample gradients) runs on its own copy of the model, once per repetition in a rotating
order, interleaved in one process, after a warm-up; the table shows medians. A variant that fails
(or whose warm-up passes ``--cap`` seconds) prints ``n/a`` with a footnote giving the reason.

    python benchmarks/benchmark.py [--reps 20] [--warmup 2] [--extensions BatchGrad,Variance | all]
        [--problems mlp,mlp-sigmoid,3c3d-64,3c3d-128,3c3d-sigmoid-128,resnet,vit,gpt,
                    autoencoder,resnet18-tv,vit-tiny-timm-32,gpt2-small-hf,gpt2-2l-hf]
        [--threads 2] [--cap SECONDS] [--max-memory-gb GB] [--profile VARIANT [--top 25]]

The rows ending in -tv, -timm, -hf are library models (torchvision, timm, Hugging Face
transformers, random weights, no download) extended as they are with ``extend(model)``.
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
# every attribute the variants leave on parameters (freed after each timed run)
FIELDS = {e().savefield for e in EXTENSIONS.values()} | {"grad_sample"}


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


def import_torchvision() -> Any:
    """torchvision beside the CPU torch (``tests.zoo.import_torchvision``); timm and
    transformers import it too, so every library-model row calls this first."""
    from tests.zoo import import_torchvision as load

    return load()


def resnet18_tv() -> nn.Module:
    """torchvision's ResNet-18 (ImageNet stem) with 10 classes, eval mode (BatchNorm uses its
    running statistics: per-sample quantities need samples that do not interact)."""
    import_torchvision()
    from torchvision.models import resnet18

    return resnet18(num_classes=10).eval()


def vit_tiny_timm() -> nn.Module:
    """timm's ``vit_tiny_patch16_224`` architecture (12 layers, E=192, 3 heads) on 32x32 images
    in 4x4 patches (64 tokens + class token), 10 classes."""
    import_torchvision()
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=4
    ).eval()


GPT2_VOCAB = 50257


def gpt2_hf(layers: int = 12) -> Callable[[], nn.Module]:
    """Hugging Face ``GPT2LMHeadModel`` with ``GPT2Config()`` defaults (E=768, 12 heads, vocab
    50257, ``lm_head`` tied to ``wte``) but ``layers`` blocks, eager attention, eval mode."""

    def make() -> nn.Module:
        import_torchvision()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(n_layer=layers, use_cache=False, attn_implementation="eager")
        return GPT2LMHeadModel(config).eval()

    return make


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
    "resnet18-tv": (resnet18_tv, images(3, 32, 32), 64),
    "vit-tiny-timm-32": (vit_tiny_timm, images(3, 32, 32), 32),
    "gpt2-small-hf": (gpt2_hf(12), tokens(128, GPT2_VOCAB), 8),
    "gpt2-2l-hf": (gpt2_hf(2), tokens(128, GPT2_VOCAB), 8),
}
# problems extended with extend(..., use_converter=True)
CONVERTED = {"resnet", "vit", "gpt"}
# problems with a loss other than cross-entropy
LOSSES: dict[str, Callable[[], nn.Module]] = {"autoencoder": nn.MSELoss}


def lm_logits(out: Any, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Hugging Face causal LM's output -> next-token loss inputs ``[n L, V]``, ``[n L]``."""
    return out.logits.view(-1, out.logits.shape[-1]), y.reshape(-1)


# model output, target -> the loss's inputs (default: as they are)
HEADS: dict[str, Callable[[Any, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = {
    "gpt2-small-hf": lm_logits,
    "gpt2-2l-hf": lm_logits,
}
# problems whose modules without a rule take the automatic (torch.func) rule: strict=False
AUTOMATIC = {"gpt2-small-hf", "gpt2-2l-hf"}
# (problem, variant) -> why it is not run
SKIP: dict[tuple[str, str], str] = {
    (p, e): "exact GGN: V = 50257 backpropagated columns per token, [50257, n, L, 768] and "
    "larger per layer (~1.6 TB at the last block), does not fit"
    for p in ("gpt2-small-hf", "gpt2-2l-hf")
    for e in ("DiagGGNExact", "BatchDiagGGNExact", "SqrtGGNExact", "KFLR")
}
# footnotes printed under the table when the problem is in it
NOTES = {
    "resnet18-tv": "resnet18-tv: torchvision resnet18(num_classes=10), 3x32x32, batch 64, "
    "eval mode (BatchNorm with running statistics).",
    "vit-tiny-timm-32": "vit-tiny-timm-32: timm vit_tiny_patch16_224 architecture at "
    "img_size=32, patch_size=4 (65 tokens; 224x224 takes ~11 s per plain step here), batch 32.",
    "gpt2-small-hf": "gpt2-small-hf: GPT2LMHeadModel(GPT2Config()) (12 layers, E=768, vocab "
    "50257, tied lm_head), eager attention, batch 8 x 128 tokens, next-token CrossEntropy on "
    "logits.view(-1, V). KFAC: the embedding tied to lm_head has no Kronecker form (raises).",
    "gpt2-2l-hf": "gpt2-2l-hf: as gpt2-small-hf with 2 layers (n_layer=2).",
}


def _fresh(model: nn.Module, build: Callable[[nn.Module], Any]) -> Any:
    """``build`` on a copy of ``model`` (same weights), or the exception it raised."""
    try:
        return build(copy.deepcopy(model))
    except Exception as err:  # noqa: BLE001 (report any failure as n/a, keep going)
        return err


def release(model: nn.Module) -> None:
    """Free what a step left on ``model``'s parameters (gradients, extension fields)."""
    for p in model.parameters():
        p.grad = None
        for field in FIELDS & set(vars(p)):
            delattr(p, field)


Variant = tuple[Callable[[], None], nn.Module]  # (one step, the model it leaves results on)


def variants(problem: str, extensions: list[str]) -> dict[str, Variant | Exception]:
    """name -> (one zero-grad + forward + backward step of that variant on ``problem``, its
    model), or the exception its set-up raised."""
    make, data, n = PROBLEMS[problem]
    torch.manual_seed(0)
    loss_type = LOSSES.get(problem, nn.CrossEntropyLoss)
    head = HEADS.get(problem, lambda out, y: (out, y))
    strict = problem not in AUTOMATIC
    model, lossfunc = make(), loss_type()
    x, y = data(n)
    ext_loss = extend(loss_type())

    def step(net: nn.Module, loss: nn.Module, *exts: Callable) -> Variant:
        def run() -> None:
            net.zero_grad(set_to_none=True)
            value = loss(*head(net(x), y))
            if exts:
                # strict: a missing rule raises (else the automatic rule, with a warning)
                with backpack(*(e() for e in exts), strict=strict):
                    value.backward()
            else:
                value.backward()

        return run, net

    def extended(*exts: Callable) -> Variant | Exception:
        return _fresh(
            model,
            lambda net: step(extend(net, use_converter=problem in CONVERTED), ext_loss, *exts),
        )

    def per_sample(net: nn.Module) -> Variant:
        params = {k: p.detach() for k, p in net.named_parameters()}

        def sample_loss(p: dict, xn: torch.Tensor, yn: torch.Tensor) -> torch.Tensor:
            return lossfunc(*head(functional_call(net, p, (xn.unsqueeze(0),)), yn.unsqueeze(0)))

        grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))
        return (lambda: grads(params, x, y)), net

    def opacus(net: nn.Module) -> Variant:
        from opacus import GradSampleModule

        return step(GradSampleModule(net), lossfunc)

    result: dict[str, Variant | Exception] = {
        "plain": step(model, lossfunc),
        "extended, idle": extended(),
    }
    for name in extensions:
        reason = SKIP.get((problem, name))
        result[name] = MemoryError(reason) if reason else extended(EXTENSIONS[name])
    result["vmap(grad)"] = _fresh(model, per_sample)
    result["opacus"] = _fresh(model, opacus)
    return result


def measure(
    steps: dict[str, Variant | Exception], reps: int, warmup: int = 2, cap: float | None = None
) -> dict[str, float | Exception]:
    """Median seconds per variant, or the exception it raised (then it is not timed again).
    A variant whose warm-up step takes over ``cap`` seconds is not timed either."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    failed = {name: v for name, v in steps.items() if isinstance(v, Exception)}
    runs = {name: v for name, v in steps.items() if not isinstance(v, Exception)}
    for name, (run, model) in runs.items():
        try:
            for _ in range(warmup):
                start = time.perf_counter()
                run()
                seconds = time.perf_counter() - start
                release(model)
                if cap is not None and seconds > cap:
                    raise TimeoutError(f"one step took {seconds:.0f} s, over --cap {cap:g} s")
        except Exception as err:  # noqa: BLE001 (report any failure as n/a, keep going)
            failed[name] = err
            release(model)
    for rep in range(reps):
        names = [name for name in runs if name not in failed]
        shift = rep % max(1, len(names))
        for name in names[shift:] + names[:shift]:
            run, model = runs[name]
            try:
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
            except Exception as err:  # noqa: BLE001 (out of memory after the warm-up: n/a)
                failed[name] = err
                times[name] = []
            release(model)
    result = {name: statistics.median(t) for name, t in times.items() if t}
    return {name: result.get(name, failed.get(name)) for name in steps}


def profile(problem: str, name: str, top: int) -> None:
    """cProfile one step of variant ``name`` on ``problem`` after two warm-up steps (the third
    backward pass skips the gradient-path check of passes 1, 2, 4, 8, ...): the ``top``
    functions by own time, then backpack's functions by cumulative time."""
    import cProfile
    import pstats

    built = variants(problem, [name] if name in EXTENSIONS else [])
    if name not in built:
        raise SystemExit(f"unknown variant {name!r}: one of {', '.join(built)}")
    if isinstance(built[name], Exception):
        raise built[name]
    run, model = built[name]
    for _ in range(2):
        run()
        release(model)
    profiler = cProfile.Profile()
    profiler.runcall(run)
    print(f"=== {problem} / {name}: one step")
    stats = pstats.Stats(profiler).sort_stats("tottime")
    stats.print_stats(top)
    stats.sort_stats("cumulative").print_stats("backpack/", top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions per variant")
    parser.add_argument("--problems", default="mlp,3c3d-64,3c3d-128", help="comma-separated")
    parser.add_argument("--extensions", default=",".join(DEFAULT), help="comma-separated, or all")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--cap", type=float, help="seconds: a slower warm-up step is n/a")
    parser.add_argument(
        "--max-memory-gb", type=float, help="address-space limit: larger allocations fail (n/a)"
    )
    parser.add_argument("--profile", metavar="VARIANT", help="cProfile one step of it instead")
    parser.add_argument("--top", type=int, default=25, help="functions --profile prints")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.max_memory_gb:
        limit = int(args.max_memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    warnings.filterwarnings("ignore", message=".*automatic rule.*")  # AUTOMATIC's footnote
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # opacus
    problems = args.problems.split(",")
    extensions = list(EXTENSIONS) if args.extensions == "all" else args.extensions.split(",")
    for name in problems + extensions:
        if name not in PROBLEMS and name not in EXTENSIONS:
            parser.error(f"unknown problem or extension {name!r}")

    if args.profile:
        for problem in problems:
            profile(problem, args.profile, args.top)
        return
    results = {}
    for problem in problems:
        results[problem] = measure(variants(problem, extensions), args.reps, args.warmup, args.cap)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"median of {args.reps} interleaved repetitions; ratio to plain forward+backward"
    )
    rows = list(next(iter(results.values())))
    notes: list[str] = []
    width = max(map(len, rows)) + 2
    cols = [max(14, len(p) + 2) for p in problems]
    print("".join([f"{'variant':<{width}}", *(f"{p:>{c}}" for p, c in zip(problems, cols))]))
    for row in rows:
        cells = []
        for problem in problems:
            value, plain = results[problem][row], results[problem]["plain"]
            if isinstance(value, Exception):
                notes.append(
                    f"[{len(notes) + 1}] {problem} / {row}: "
                    f"{type(value).__name__}: {(str(value).splitlines() or [''])[0][:200]}"
                )
                cells.append(f"n/a [{len(notes)}]")
            elif row == "plain":
                cells.append(f"{1e3 * value:.1f} ms")
            elif isinstance(plain, Exception):
                cells.append(f"{1e3 * value:.1f} ms")
            else:
                cells.append(f"{value / plain:.2f}x")
        print("".join([f"{row:<{width}}", *(f"{t:>{c}}" for t, c in zip(cells, cols))]))
    for note in notes:
        print(note)
    for problem in problems:
        if problem in NOTES:
            print(NOTES[problem])


if __name__ == "__main__":
    main()

"""Quickstart: per-sample gradients and their moments from one backward pass.

An MLP on MNIST-shaped random data (no download): extend model and loss, compute BatchGrad,
BatchL2Grad, SumGradSquared and Variance in one backward, check them against ``.grad``, then
take a few SGD steps while printing the gradient signal-to-noise ratio from ``variance``.

Run: ``python examples/quickstart.py``
"""

import torch
from torch import nn

from backpack import backpack, extend
from backpack.extensions import BatchGrad, BatchL2Grad, SumGradSquared, Variance

torch.manual_seed(0)
N = 64
X = torch.randn(N, 1, 28, 28)  # a batch of MNIST-shaped images
y = torch.randint(0, 10, (N,))

model = extend(nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10)))
lossfunc = extend(nn.CrossEntropyLoss())  # reduction="mean": per-sample quantities carry 1/N

loss = lossfunc(model(X), y)
with backpack(BatchGrad(), BatchL2Grad(), SumGradSquared(), Variance()):
    loss.backward()

row = "{:<10}{:<12}{:<16}{:<10}{:<18}{}"
print(row.format("param", "shape", "grad_batch", "batch_l2", "sum_grad_squared", "variance"))
for name, p in model.named_parameters():
    fields = (p, p.grad_batch, p.batch_l2, p.sum_grad_squared, p.variance)
    print(row.format(name, *(str(tuple(t.shape)) for t in fields)))
    # the per-sample gradients sum to the gradient; the other quantities are their reductions
    torch.testing.assert_close(p.grad_batch.sum(0), p.grad)
    torch.testing.assert_close(p.batch_l2, p.grad_batch.flatten(1).square().sum(1))
    torch.testing.assert_close(p.sum_grad_squared, p.grad_batch.square().sum(0))
    torch.testing.assert_close(p.variance, p.grad_batch.var(0, unbiased=False))
print(
    "checks passed: grad_batch.sum(0) == grad, and batch_l2, sum_grad_squared, variance "
    "are its reductions\n"
)

# SGD, watching the gradient signal-to-noise ratio mean_n(g_n)**2 / var_n(g_n) per weight, averaged
# over weights; mean_n(grad_batch) = grad / N (the ratio does not depend on the 1/N of the loss).
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(5):
    optimizer.zero_grad()
    loss = lossfunc(model(X), y)
    with backpack(Variance()):
        loss.backward()
    snr = torch.cat(
        [((p.grad / N) ** 2 / (p.variance + 1e-30)).flatten() for p in model.parameters()]
    ).mean()
    print(f"step {step}: loss {loss.item():.4f}  mean gradient SNR {snr.item():.4f}")
    optimizer.step()

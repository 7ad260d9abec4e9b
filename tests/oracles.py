"""Independent references from autograd / torch.func, for float64 comparisons."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap


def loss_scale(lossfunc: nn.Module, out: Tensor, y: Tensor) -> float:
    """Factor f with ``loss(out, y) == f * loss_sum(out, y)`` (the reduction's normaliser)."""
    if lossfunc.reduction == "sum":
        return 1.0
    summed = type(lossfunc)(reduction="sum")(out, y)
    return (lossfunc(out, y) / summed).item()


def per_sample_grads(model: nn.Module, lossfunc: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Per-sample gradients ``[n, *p]`` of sample n's contribution to the batch loss.

    ``vmap(grad)`` over ``functional_call``; falls back to a loop over samples for layers
    without batching rules (recurrent layers).
    """
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        f = loss_scale(lossfunc, model(x), y)
    summed = type(lossfunc)(reduction="sum")

    def sample_loss(p: dict, xn: Tensor, yn: Tensor) -> Tensor:
        out = functional_call(model, (p, buffers), (xn.unsqueeze(0),))
        return f * summed(out, yn.unsqueeze(0))

    try:
        return vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
    except (RuntimeError, NotImplementedError):
        rows = [grad(sample_loss)(params, x[i], y[i]) for i in range(x.shape[0])]
        return {k: torch.stack([r[k] for r in rows]) for k in params}

"""Independent references from autograd / torch.func, for float64 comparisons."""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from backpack import disable
from backpack.engine.record import _Record


def loss_scale(lossfunc: nn.Module, out: Tensor, y: Tensor) -> float:
    """Factor f with ``loss(out, y) == f * loss_sum(out, y)`` (the reduction's normaliser)."""
    if lossfunc.reduction == "sum":
        return 1.0
    summed = type(lossfunc)(reduction="sum")(out, y)
    return (lossfunc(out, y) / summed).item()


def per_sample_grads(
    model: nn.Module, lossfunc: nn.Module, x: Tensor, y: Tensor
) -> dict[str, Tensor]:
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


def per_sample_grads_graph(
    model: nn.Module, lossfunc: nn.Module, x: Tensor, y: Tensor
) -> dict[str, Tensor]:
    """``per_sample_grads`` as part of the autograd graph (differentiable w.r.t. the parameters
    and ``x``): one ``autograd.grad(create_graph=True)`` per sample, through ``model`` itself
    (batch axis 0, nothing recorded). Not ``vmap(grad)``: differentiated by an outer autograd,
    it gets LayerNorm's second derivatives wrong (torch 2.13, against finite differences)."""
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        f = loss_scale(lossfunc, model(x), y)
    summed = type(lossfunc)(reduction="sum")
    rows = []
    with disable():
        for i in range(x.shape[0]):
            loss = f * summed(model(x[i : i + 1]), y[i : i + 1])
            rows.append(torch.autograd.grad(loss, list(params.values()), create_graph=True))
    return {k: torch.stack([r[j] for r in rows]) for j, k in enumerate(params)}


def _functional(model: nn.Module):
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())
    return params, lambda p, x: functional_call(model, (p, buffers), (x,))


def ggn_diag(model: nn.Module, lossfunc: nn.Module, x: Tensor, y: Tensor, per_sample: bool = False):
    """GGN diagonal ``diag(J^T H J)`` from explicit Jacobians and the loss Hessian w.r.t. the output.

    ``per_sample``: ``[n, *p]`` with sample n's Jacobian and its block of the loss Hessian.
    """
    params, f = _functional(model)
    out = f(params, x)
    jac = torch.func.jacrev(f)(params, x)  # name -> [*out, *p]
    hess = torch.func.hessian(lambda o: lossfunc(o, y))(out).reshape(out.numel(), out.numel())
    n, per = out.shape[0], out[0].numel()
    result = {}
    for name, p in params.items():
        j = jac[name].reshape(out.numel(), p.numel())
        if per_sample:
            jn = j.reshape(n, per, -1)
            hn = torch.stack(
                [hess[i * per : (i + 1) * per, i * per : (i + 1) * per] for i in range(n)]
            )
            result[name] = torch.einsum("nap,nab,nbp->np", jn, hn, jn).reshape(n, *p.shape)
        else:
            result[name] = torch.einsum("ap,ab,bp->p", j, hess, j).reshape(p.shape)
    return result


def hessian_diag(
    model: nn.Module, lossfunc: nn.Module, x: Tensor, y: Tensor, per_sample: bool = False
):
    """Diagonal of the loss Hessian w.r.t. each parameter, by double backward (torch.func.hessian
    of each parameter's own block).

    ``per_sample``: ``[n, *p]``, the Hessian diagonals of each sample's contribution to the loss.
    """
    params, f = _functional(model)
    with torch.no_grad():
        scale = loss_scale(lossfunc, f(params, x), y)
    summed = type(lossfunc)(reduction="sum")

    def diag(loss_fn, xs, ys):
        result = {}
        for k, p in params.items():

            def of_k(pk, k=k):
                return loss_fn(f({**params, k: pk}, xs), ys)

            result[k] = (
                torch.func.hessian(of_k)(p)
                .reshape(p.numel(), p.numel())
                .diagonal()
                .reshape(p.shape)
            )
        return result

    if not per_sample:
        return diag(lossfunc, x, y)
    rows = [
        diag(lambda o, t: scale * summed(o, t), x[i : i + 1], y[i : i + 1])
        for i in range(x.shape[0])
    ]
    return {k: torch.stack([r[k] for r in rows]) for k in params}


def ggn_block(model: nn.Module, lossfunc: nn.Module, x: Tensor, y: Tensor, name: str) -> Tensor:
    """The GGN block ``J^T H J`` ``[p, p]`` of one parameter (flattened)."""
    params, f = _functional(model)
    out = f(params, x)
    j = torch.func.jacrev(f)(params, x)[name].reshape(out.numel(), -1)
    hess = torch.func.hessian(lambda o: lossfunc(o, y))(out).reshape(out.numel(), out.numel())
    return j.T @ hess @ j


def hessian_block(model: nn.Module, lossfunc: nn.Module, x: Tensor, y: Tensor, name: str) -> Tensor:
    """The Hessian block ``[p, p]`` of the loss w.r.t. one parameter (flattened)."""
    params = {k: p.detach() for k, p in model.named_parameters()}

    def loss(p: Tensor) -> Tensor:
        return lossfunc(torch.func.functional_call(model, {**params, name: p}, (x,)), y)

    return torch.func.hessian(loss)(params[name]).reshape(params[name].numel(), -1)


FIRST_ORDER = {  # savefield of each first-order extension -> its value from per-sample grads
    "grad_batch": lambda g: g,
    "batch_l2": lambda g: g.flatten(1).square().sum(1),
    "sum_grad_squared": lambda g: g.square().sum(0),
    "variance": lambda g: g.var(0, unbiased=False),
}


def assert_first_order(params: dict, grads: dict) -> None:
    """Savefields of BatchGrad, BatchL2Grad, SumGradSquared and Variance on ``params`` against
    per-sample gradients ``grads`` ``{name: [N, *P]}``."""
    for key, p in params.items():
        for field, reduce in FIRST_ORDER.items():
            got, want = getattr(p, field), reduce(grads[key])
            torch.testing.assert_close(got, want, msg=lambda m, f=field: f"{key} {f}: {m}")


def assert_first_order_and_diagonals(
    params: dict, model: nn.Module, lossfunc: nn.Module, x: Tensor, y: Tensor
) -> None:
    """``assert_first_order``, and (Batch)DiagGGNExact, (Batch)DiagHessian and DiagGGNMC's
    shape on ``params`` against the per-sample oracles of ``model`` (attention by SDPA's math
    kernel: the fused one has no forward-mode AD)."""
    with sdpa_kernel(SDPBackend.MATH):
        grads = per_sample_grads(model, lossfunc, x, y)
        ggn = ggn_diag(model, lossfunc, x, y, per_sample=True)
        hess = hessian_diag(model, lossfunc, x, y, per_sample=True)
    assert_first_order(params, grads)
    for key, p in params.items():
        torch.testing.assert_close(p.diag_ggn_exact, ggn[key].sum(0))
        torch.testing.assert_close(p.diag_ggn_exact_batch, ggn[key])
        torch.testing.assert_close(p.diag_h, hess[key].sum(0))
        torch.testing.assert_close(p.diag_h_batch, hess[key])
        assert p.diag_ggn_mc.shape == p.shape


def flat_factors(factors: list) -> list[Tensor]:
    """Kronecker factors ``[G, A]``, ``[G]`` or a list of such pairs, as one flat list."""
    return [t for f in factors for t in ([f] if isinstance(f, Tensor) else flat_factors(f))]


def assert_kfra_exact_at_batch_one(params: dict, n: int) -> None:
    """KFRA against KFLR on ``params``: equal at batch size ``n = 1`` (the batch-averaged dense
    recursion is exact there), else symmetric positive semi-definite factors."""
    for key, p in params.items():
        for kfra, kflr in zip(flat_factors(p.kfra), flat_factors(p.kflr), strict=True):
            if n == 1:
                torch.testing.assert_close(kfra, kflr, msg=key)
            else:
                torch.testing.assert_close(kfra, kfra.T, msg=key)
                assert torch.linalg.eigvalsh(kfra).min() >= -1e-10 * kfra.abs().max(), key


def live_records() -> list[_Record]:
    """The forward records not yet released (after a garbage collection)."""
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, _Record) and o.io is not None]


def assert_memory_flat(step: Callable[[int], None], steps: int) -> None:
    """Two like windows of ``steps`` calls ``step(i)``: the live tensors after the second are
    no more than after the first (a leak grows in each, a one-off allocation only in the
    first), and no forward record is left."""

    def tensors_after_window() -> int:
        for i in range(steps):
            step(i)
        gc.collect()
        return sum(isinstance(o, Tensor) for o in gc.get_objects())

    first = tensors_after_window()
    assert tensors_after_window() <= first
    assert not live_records()

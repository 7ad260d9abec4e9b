"""``nn.RNN``, ``nn.LSTM``, ``nn.GRU``: per-sample gradients by recomputing the recurrence.

Every weight enters through a pre-activation of one layer and direction: ``z_ih[n, t] = W_ih
x[n, t] + b_ih`` (all steps at once), ``z_hh[n, t] = W_hh h[n, t-1] + b_hh`` (per step) and, for
an LSTM with ``proj_size``, ``p[n, t] = W_hr m[n, t]``. In backward the recurrence is re-run from
the stored input with these as explicit tensors; one ``autograd.grad`` of the outputs, weighted by
the received output gradients, gives the deltas ``d = dL/dz`` ``[n, t, o]``. A weight's per-sample
gradient is ``sum_t d[n, t] a[n, t]^T`` with ``a`` ``[n, t, i]`` what it multiplies (a bias: no
``a``), the linear-form factors of linear_form.py with time as the shared positions.

Outputs in pytree order: ``(output, h_n)``, LSTM ``(output, h_n, c_n)``; states ``[layers*dirs, n,
h]`` have their batch on axis 1 whatever ``batch_first`` is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils._pytree import tree_map

from backpack.derivatives.autograd import (
    param_residual_diag_autograd,
    param_residual_mat_prod_autograd,
    residual_factors_autograd,
)
from backpack.derivatives.base import IO, Request, Rule, chunks
from backpack.registry import register

Factors = dict[str, tuple[Tensor, Tensor | None]]  # param name -> (delta b, activation a | None)


def _args(io: IO) -> tuple[Any, Any]:
    """``(input, hx)`` of the call, positional or keyword (``hx`` None if not given)."""
    args = (*io.inputs, *(io.kwargs.get(k) for k in ("input", "hx")[len(io.inputs) :]))
    return args[0], args[1] if len(args) > 1 else None


def _cell(module: nn.Module, zi: Tensor, zh: Tensor, h: Tensor, c: Tensor | None):
    """One step ``(z_ih_t, z_hh_t, h_{t-1}, c_{t-1}) -> (h_t or LSTM m_t, c_t)``, torch gates."""
    if isinstance(module, nn.LSTM):
        i, f, g, o = (zi + zh).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if isinstance(module, nn.GRU):
        (ri, ui, ni), (rh, uh, nh) = zi.chunk(3, -1), zh.chunk(3, -1)
        r, u = torch.sigmoid(ri + rh), torch.sigmoid(ui + uh)
        n = torch.tanh(ni + r * nh)
        return n + u * (h - n), None
    act = torch.tanh if module.nonlinearity == "tanh" else torch.relu
    return act(zi + zh), None


def _leaf(z: Tensor) -> Tensor:
    """``z`` as a differentiable point of the graph (a leaf where nothing upstream needs grad)."""
    return z if z.requires_grad else z.requires_grad_()


def _recompute(
    module: nn.RNNBase, io: IO, grads: tuple[Tensor, ...], batched: bool = False
) -> tuple[Factors, Tensor | None]:
    """Re-run the recurrence on ``[n, t, f]`` and backpropagate ``grads`` (output layout; the
    first ``len(grads)`` outputs) to every ``z``: deltas ``[(v,) n, t, o]``. ``batched``: grads
    carry a leading ``v`` axis, and the input gradient ``[v, *x]`` is returned too (else None)."""
    x, hx = _args(io)
    if batched:  # a leaf, to get J^T mat w.r.t. the input from the same backward
        x = x.detach().requires_grad_()
    x_in = x
    if not module.batch_first:
        with torch.enable_grad():  # backward runs under no_grad: keep x tied to x_in
            x = x.transpose(0, 1)
    n, steps = x.shape[:2]
    dirs = 2 if module.bidirectional else 1
    h_size = module.proj_size or module.hidden_size
    lstm = isinstance(module, nn.LSTM)
    h0, c0 = (hx if lstm else (hx, None)) if hx is not None else (None, None)
    h0 = x.new_zeros(module.num_layers * dirs, n, h_size) if h0 is None else h0.detach()
    if lstm:
        c0 = x.new_zeros(module.num_layers * dirs, n, module.hidden_size) if c0 is None else c0
        c0 = c0.detach()
    zs: dict[str, Any] = {}  # param name -> z (a tensor, or a list over time steps)
    acts: dict[str, Tensor | None] = {}
    finals: list[tuple[Tensor, Tensor | None]] = []

    def param(name: str) -> Tensor | None:
        p = getattr(module, name, None)
        return None if p is None else p.detach()

    with torch.enable_grad():
        layer_in = x
        for layer in range(module.num_layers):
            outs = []
            for d in range(dirs):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                w_ih, w_hh, w_hr = (param(f"weight_{k}{sfx}") for k in ("ih", "hh", "hr"))
                b_ih, b_hh = param(f"bias_ih{sfx}"), param(f"bias_hh{sfx}")
                z_ih = _leaf(nn.functional.linear(layer_in, w_ih, b_ih))
                zi_steps = z_ih.unbind(1)  # one stacking backward, not a zero-fill per step
                h, c = h0[layer * dirs + d], None if c0 is None else c0[layer * dirs + d]
                hs, z_hh, h_prev, ms, ps = [], [], [], [], []
                for t in reversed(range(steps)) if d else range(steps):
                    h_prev.append(h)
                    z_hh.append(_leaf(nn.functional.linear(h, w_hh, b_hh)))
                    h, c = _cell(module, zi_steps[t], z_hh[-1], h, c)
                    if w_hr is not None:
                        ms.append(h)
                        h = h @ w_hr.T
                        ps.append(h)
                    hs.append(h)
                finals.append((h, c))
                order = slice(None, None, -1 if d else 1)  # lists back into time order
                outs.append(torch.stack(hs[order], 1))
                zs[f"weight_ih{sfx}"], acts[f"weight_ih{sfx}"] = z_ih, layer_in.detach()
                z_hh = zs[f"weight_hh{sfx}"] = z_hh[order]
                acts[f"weight_hh{sfx}"] = torch.stack(h_prev[order], 1).detach()
                if b_ih is not None:
                    zs[f"bias_ih{sfx}"], acts[f"bias_ih{sfx}"] = z_ih, None
                    zs[f"bias_hh{sfx}"], acts[f"bias_hh{sfx}"] = z_hh, None
                if w_hr is not None:
                    zs[f"weight_hr{sfx}"] = ps[order]
                    acts[f"weight_hr{sfx}"] = torch.stack(ms[order], 1).detach()
            layer_in = torch.cat(outs, -1)
        outputs = [layer_in, torch.stack([h for h, _ in finals])]
        if lstm:
            outputs.append(torch.stack([c for _, c in finals]))
        g_out = grads[0] if module.batch_first else grads[0].transpose(-3, -2)
        unique = {id(z): z for v in zs.values() for z in (v if isinstance(v, list) else [v])}
        wrt = [*unique.values(), *([x_in] if batched else [])]
        deltas = torch.autograd.grad(
            outputs[: len(grads)], wrt, [g_out, *grads[1:]], is_grads_batched=batched
        )
    delta_of = dict(zip(unique, deltas))

    def delta(z: Any) -> Tensor:  # a weight and its bias share one stacked delta
        if id(z) not in delta_of:
            delta_of[id(z)] = torch.stack([delta_of[id(zt)] for zt in z], -2)
        return delta_of[id(z)]

    factors = {name: (delta(z), acts[name]) for name, z in zs.items()}
    return factors, deltas[-1] if batched else None


@register(nn.RNN, nn.LSTM, nn.GRU)
class RecurrentRule(Rule):
    """First-order quantities of ``nn.RNN``/``nn.LSTM``/``nn.GRU``.

    Any number of layers, directions, biases, nonlinearity, ``proj_size`` and initial state.
    """

    needs_output = False
    differentiable = False  # the recurrence is recomputed from detached tensors

    def batch_axis(self, module: nn.RNNBase) -> int:
        return 0 if module.batch_first else 1

    def subsample(self, module: nn.RNNBase, io: IO, g: Any, idx: list[int]) -> tuple[IO, Any]:
        """Pick ``idx`` in inputs, output, gradients: sequences on the batch axis, states on 1."""
        grads = g if isinstance(g, tuple) else (g,)
        ax = self.batch_axis(module)
        index = torch.tensor(idx, device=grads[0].device)

        def pick(tree: Any, axis: int) -> Any:
            return tree_map(lambda t: t.index_select(axis, index), tree)

        inputs = tuple(pick(t, ax if i == 0 else 1) for i, t in enumerate(io.inputs))
        kwargs = {k: pick(v, ax if k == "input" else 1) for k, v in io.kwargs.items()}
        output = None if io.output is None else (pick(io.output[0], ax), pick(io.output[1], 1))
        sub = tuple(pick(t, ax if i == 0 else 1) for i, t in enumerate(grads))
        return IO(inputs, output, kwargs), sub

    def check(self, module: nn.RNNBase, io: IO, request: Request | None) -> None:
        where = f"{request.name} on {module}"
        x, _ = _args(io)
        if isinstance(x, PackedSequence):
            raise NotImplementedError(
                f"{where}: PackedSequence inputs are not supported. Pass a padded tensor "
                "(torch.nn.utils.rnn.pad_packed_sequence) instead."
            )
        if x.dim() != 3:
            raise NotImplementedError(
                f"{where}: unbatched input of shape {tuple(x.shape)} has no batch axis. "
                "Add one (x.unsqueeze(0) with batch_first=True)."
            )
        if request.second_order and not module.batch_first and request.subsampled:
            raise NotImplementedError(
                f"{where}: subsampling second-order quantities needs batch_first=True (the "
                "backpropagated matrices are subsampled on axis 1, time here)."
            )
        if module.training and module.dropout > 0 and module.num_layers > 1:
            raise NotImplementedError(
                f"{where}: dropout={module.dropout} between layers in train mode draws masks "
                "that cannot be recovered in backward. Call module.eval() or set dropout=0."
            )

    def _factors(self, module: nn.RNNBase, io: IO, g: Any, name: str) -> tuple[Tensor, Any]:
        if "factors" not in io.cache:
            io.cache["factors"] = _recompute(module, io, g if isinstance(g, tuple) else (g,))[0]
        return io.cache["factors"][name]

    def _backprop(self, module: nn.RNNBase, io: IO, mat: Tensor) -> tuple[Factors, Tensor]:
        """Deltas and input gradient for ``mat`` ``[v, *out]`` on the sequence output, memoised
        per ``mat`` (the stream asks for both with the same tensor); h_n/c_n receive nothing."""
        key = ("mat", id(mat), tuple(mat.shape))
        hit = io.cache.get(key)
        if hit is None or hit[0] is not mat:  # holding mat keeps its id from being reused
            hit = io.cache[key] = (mat, *_recompute(module, io, (mat,), batched=True))
        return hit[1], hit[2]

    def jac_t_mat_prod(self, module: nn.RNNBase, io: IO, mat: Tensor) -> Tensor:
        """``J_x^T mat``: ``[v, *out] -> [v, *in]`` (sequence output, module layout)."""
        return self._backprop(module, io, mat)[1]

    def param_jac_t_mat_prod(
        self, module: nn.RNNBase, io: IO, mat: Tensor, name: str, sum_batch: bool = True
    ) -> Tensor:
        """``sum_t b[v, n, t] a[n, t]^T`` ``[v, (n,) o, i]`` (bias: ``sum_t b``), ``b`` the
        deltas of ``mat`` ``[v, *out]`` on the sequence output."""
        b, a = self._backprop(module, io, mat)[0][name]
        if a is None:
            return b.sum((1, 2) if sum_batch else 2)
        return torch.einsum("vnto,nti->voi" if sum_batch else "vnto,nti->vnoi", b, a)

    def kron_factors(
        self, module: nn.RNNBase, io: IO, mat: Tensor, name: str
    ) -> list[tuple[Tensor, Tensor]] | None:
        """A weight is a Linear shared over the time steps: one Kronecker block ``(a [1, n, 1,
        i, t], b [v, n, 1, o, t])``, ``a`` its input at each step (``x_t``, ``h_{t-1}``, the
        LSTM's cell output for ``weight_hr``), ``b`` the recomputed deltas of ``mat`` at its
        pre-activation; biases: None (their exact block ``[G]``)."""
        b, a = self._backprop(module, io, mat)[0][name]
        if a is None:
            return None
        return [(a.transpose(1, 2)[None, :, None], b.transpose(2, 3)[:, :, None])]

    def _axes(self, module: nn.RNNBase, io: IO) -> tuple[list[int], list[int]]:
        """Batch axis of each input (sequence, states) and each output (sequence, states)."""
        ax = self.batch_axis(module)
        return [ax] + [1] * (len(io.inputs) - 1), [ax, 1, 1]

    def residual_factors(self, module: nn.RNNBase, io: IO, g: Any) -> list[tuple[float, Any]]:
        """The recurrence's second derivatives w.r.t. the input, exact and dense per sample
        (``t * i`` Hessian-vector products by torch.func)."""
        return residual_factors_autograd(module, io, g, self._axes(module, io)[0])

    def param_residual_diag(
        self, module: nn.RNNBase, io: IO, g: Any, name: str, sum_batch: bool = True
    ) -> Tensor:
        """Every weight sits inside the curved recurrence: its own second derivatives, exact by
        torch.func (one Hessian-vector product per entry)."""
        in_axes, out_axes = self._axes(module, io)
        return param_residual_diag_autograd(module, io, g, name, sum_batch, in_axes, out_axes)

    def param_residual_mat_prod(
        self, module: nn.RNNBase, io: IO, g: Any, name: str, mat: Tensor
    ) -> Tensor:
        return param_residual_mat_prod_autograd(module, io, g, name, mat)

    def batch_grad(
        self, module: nn.RNNBase, io: IO, g: Any, name: str, out: Tensor | None = None
    ) -> Tensor:
        """``sum_t b[n, t] a[n, t]^T`` ``[n, o, i]`` (bias: ``sum_t b[n, t]`` ``[n, o]``)."""
        key = ("batch_grad", name)
        if key not in io.cache:
            b, a = self._factors(module, io, g, name)
            io.cache[key] = b.sum(1) if a is None else torch.einsum("nto,nti->noi", b, a)
        return io.cache[key]

    def grad(self, module: nn.RNNBase, io: IO, g: Any, name: str) -> Tensor:
        """``sum_{n,t} b a^T`` ``[o, i]`` (bias: ``[o]``)."""
        b, a = self._factors(module, io, g, name)
        return b.sum((0, 1)) if a is None else torch.einsum("nto,nti->oi", b, a)

    def batch_l2(self, module: nn.RNNBase, io: IO, g: Any, name: str) -> Tensor:
        """``||sum_t b_t a_t^T||^2 = sum_{t,t'} (b_t.b_t')(a_t.a_t')`` ``[n]`` if cheaper."""
        b, a = self._factors(module, io, g, name)
        if a is not None and ("batch_grad", name) not in io.cache:
            steps, dim_b, dim_a = b.shape[1], b.shape[2], a.shape[2]
            if steps * (dim_a + dim_b) < dim_a * dim_b:
                gram_b = torch.einsum("nto,nso->nts", b, b)
                return (gram_b * torch.einsum("nti,nsi->nts", a, a)).sum((1, 2))
        return self.batch_grad(module, io, g, name).flatten(1).square().sum(1)

    def sum_grad_squared(self, module: nn.RNNBase, io: IO, g: Any, name: str) -> Tensor:
        """``sum_n (sum_t b a^T)^2`` ``[o, i]``, per-sample gradients built in batch chunks."""
        b, a = self._factors(module, io, g, name)
        if a is None or ("batch_grad", name) in io.cache:
            return self.batch_grad(module, io, g, name).square().sum(0)
        out = 0
        for idx in chunks(b.shape[0], b.shape[2] * a.shape[2]):
            out = out + torch.einsum("nto,nti->noi", b[idx], a[idx]).square().sum(0)
        return out

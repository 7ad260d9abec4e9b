"""``nn.MultiheadAttention``: per-sample gradients by recomputing the projections.

With batch-first inputs ``q [n, L, Eq]``, ``k [n, S, Ek]``, ``v [n, S, Ev]`` the module computes
``Q = q Wq^T + bq`` (likewise ``K``, ``V``), the attention core ``O = core(Q, K, V, bias_k,
bias_v)`` ``[n, L, E]`` (heads, masks, softmax) and ``Y = O Wo^T + bo``. In backward the
projections are recomputed and one vjp of the core (samples are independent) gives the deltas
``dQ, dK, dV`` and per-sample ``bias_k``/``bias_v`` gradients; every projection weight's
per-sample gradient is then ``sum_l d[n, l] a[n, l]^T`` (one einsum), as for a Linear layer on
sequences. ``out_proj`` is a child Linear that the forward never calls as a module, so this
rule owns its parameters (dotted names ``out_proj.weight``/``out_proj.bias``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp, vmap

from backpack.derivatives.autograd import (
    param_residual_diag_autograd,
    param_residual_mat_prod_autograd,
    residual_factors_autograd,
)
from backpack.derivatives.base import IO, Request, Rule
from backpack.derivatives.linear import LinearRule
from backpack.registry import register

_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")
_DEFAULTS = {"need_weights": True, "average_attn_weights": True}


# projection weights -> their row blocks, by the projection's input ("o": out_proj's, the core)
def _linear_in(name: str) -> bool:
    """Whether the attention output is linear in parameter ``name`` (``Wv``, ``bias_v``,
    ``out_proj``): no second derivative of its own."""
    return name.startswith("out_proj") or name in ("v_proj_weight", "bias_v")


_KRON_BLOCKS = {
    "in_proj_weight": "qkv",
    "q_proj_weight": "q",
    "k_proj_weight": "k",
    "v_proj_weight": "v",
    "out_proj.weight": "o",
}
_LINEAR = LinearRule()


def _call_args(io: IO) -> dict[str, Any]:
    """The call's arguments by name, positional or keyword."""
    return {**_DEFAULTS, **dict(zip(_ARGS, io.inputs)), **io.kwargs}


def _weights(module: nn.MultiheadAttention, detach: bool = True) -> dict[str, Tensor | None]:
    """``Wq, Wk, Wv, bq, bk, bv`` (split from the packed ``in_proj`` where used)."""
    E = module.embed_dim
    if module._qkv_same_embed_dim:
        w = module.in_proj_weight.split(E)
    else:
        w = tuple(getattr(module, f"{c}_proj_weight") for c in "qkv")
    b = (None,) * 3 if module.in_proj_bias is None else module.in_proj_bias.split(E)
    out = dict(zip(("wq", "wk", "wv", "bq", "bk", "bv"), (*w, *b)))
    return {k: t.detach() if detach and t is not None else t for k, t in out.items()}


def _float_mask(mask: Tensor | None, like: Tensor) -> Tensor | None:
    """Boolean masks (True: not allowed) as additive ``-inf`` masks, float masks unchanged."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros_like(mask, dtype=like.dtype).masked_fill(mask, float("-inf"))


def _core(module: nn.MultiheadAttention, args: dict, Q, K, V, bias_k, bias_v, fused=False):
    """Attention of the projections ``[n, L|S, E]`` -> ``(O [n, L, E], (weights))``;
    ``bias_k``/``bias_v`` ``[n, 1, E]`` (or None) are appended to the keys/values.
    ``fused``: torch's fused kernel where no weights are returned (as the module's own forward;
    it has reverse-mode AD only, and no batching rule)."""
    n, L, E = Q.shape
    h = module.num_heads
    attn_mask = _float_mask(args.get("attn_mask"), Q)
    kpm = _float_mask(args.get("key_padding_mask"), Q)
    extra = []
    if bias_k is not None:
        K, V = torch.cat([K, bias_k], 1), torch.cat([V, bias_v], 1)
        extra.append(1)
    if module.add_zero_attn:
        K, V = F.pad(K, (0, 0, 0, 1)), F.pad(V, (0, 0, 0, 1))
        extra.append(1)
    if extra:  # the appended keys are never masked
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, sum(extra)))
        kpm = None if kpm is None else F.pad(kpm, (0, sum(extra)))
    S = K.shape[1]
    if attn_mask is not None and attn_mask.dim() == 3:  # [n h, L, S]: per sample and head
        attn_mask = attn_mask.view(n, h, L, S)
    kpm = None if kpm is None else kpm.view(n, 1, 1, S)
    heads = [t.reshape(n, -1, h, E // h).transpose(1, 2) for t in (Q, K, V)]  # [n, h, *, d]
    if fused and not args["need_weights"]:
        if args.get("is_causal") and kpm is None and not extra:  # attn_mask is the causal mask
            out = F.scaled_dot_product_attention(*heads, is_causal=True)
        else:
            masks = [m for m in (attn_mask, kpm) if m is not None]
            mask = sum(masks[1:], masks[0]) if masks else None
            out = F.scaled_dot_product_attention(*heads, attn_mask=mask)
        return (out.transpose(1, 2).reshape(n, L, E),)
    scores = heads[0] @ heads[1].transpose(-1, -2) / math.sqrt(E // h)  # [n, h, L, S]
    for mask in (attn_mask, kpm):
        if mask is not None:
            scores = scores + mask
    attn = scores.softmax(-1)
    out = (attn @ heads[2]).transpose(1, 2).reshape(n, L, E)
    if not args["need_weights"]:
        return (out,)
    return out, attn.mean(1) if args["average_attn_weights"] else attn


def _batch_first(module: nn.MultiheadAttention, t: Tensor | None) -> Tensor | None:
    return t if t is None or module.batch_first else t.transpose(-3, -2)


def _projections(module: nn.MultiheadAttention, args: dict, detach: bool = True) -> tuple:
    """Batch-first inputs ``(q, k, v)``, projections ``(Q, K, V)`` and ``bias_k``/``bias_v``
    expanded to ``[n, 1, E]`` (empty without ``add_bias_kv``)."""
    xs = [_batch_first(module, args[a]) for a in ("query", "key", "value")]
    w = _weights(module, detach)
    proj = [F.linear(x, w[f"w{c}"], w[f"b{c}"]) for x, c in zip(xs, "qkv")]
    biases = [] if module.bias_k is None else [module.bias_k, module.bias_v]
    n = xs[0].shape[0]
    return xs, proj, [(b.detach() if detach else b).expand(n, 1, -1) for b in biases]


class _Explicit(nn.Module):
    """The attention call written out in differentiable ops (torch's fused kernels lack
    forward-mode AD), for the torch.func second derivatives; parameters are ``mha.*``."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self.mha = mha

    def forward(self, *inputs: Any, **kwargs: Any) -> tuple[Tensor, ...]:
        m = self.mha
        args = _call_args(IO(inputs, None, kwargs))
        _, proj, biases = _projections(m, args, detach=False)
        out, *weights = _core(m, args, *proj, *(biases or (None, None)))
        return (_batch_first(m, F.linear(out, m.out_proj.weight, m.out_proj.bias)), *weights)


def _backward(
    module: nn.MultiheadAttention, io: IO, gs: tuple, first_order: bool = False
) -> tuple[dict, tuple | None, dict]:
    """Per-sample parameter gradients ``{name: [n, *param]}``, input gradients (module layout)
    and the gradients w.r.t. the projections' outputs ``{"q"|"k"|"v"|"o": [n, L|S, E]}``
    (batch first; ``"o"``: ``out_proj``) for output gradients ``gs`` (module layout;
    ``(g_out, g_weights | None)``). ``first_order``: one gradient, not vmapped (fused attention
    kernel) and no input gradients (autograd computes those)."""
    args = _call_args(io)
    (q, k, v), proj, bias_kv = _projections(module, args)
    w = _weights(module)
    (core_out, *weights), core_vjp = vjp(
        lambda q_, k_, v_, *b: _core(module, args, q_, k_, v_, *(b or (None, None)), first_order),
        *proj,
        *bias_kv,
    )
    g_out = _batch_first(module, gs[0])
    g_w = [gs[1] if len(gs) > 1 and gs[1] is not None else torch.zeros_like(w) for w in weights]
    dO = g_out @ module.out_proj.weight.detach()
    dQ, dK, dV, *dbkv = core_vjp((dO, *g_w))
    grads = {"out_proj.weight": torch.einsum("nlo,nli->noi", g_out, core_out)}
    if module.out_proj.bias is not None:
        grads["out_proj.bias"] = g_out.sum(1)
    if module.bias_k is not None:  # the parameters are [1, 1, E]
        grads["bias_k"], grads["bias_v"] = (d.unsqueeze(1) for d in dbkv)
    w_grads = [torch.einsum("nlo,nli->noi", d, x) for d, x in zip((dQ, dK, dV), (q, k, v))]
    if module._qkv_same_embed_dim:
        grads["in_proj_weight"] = torch.cat(w_grads, 1)
    else:
        grads.update({f"{c}_proj_weight": gw for c, gw in zip("qkv", w_grads)})
    if module.in_proj_bias is not None:
        grads["in_proj_bias"] = torch.cat([d.sum(1) for d in (dQ, dK, dV)], 1)
    x_grads = None
    if not first_order:
        x_grads = tuple(_batch_first(module, d @ w[f"w{c}"]) for d, c in zip((dQ, dK, dV), "qkv"))
    return grads, x_grads, dict(zip("qkvo", (dQ, dK, dV, g_out)))


@register(nn.MultiheadAttention)
class MultiheadAttentionRule(Rule):
    """``nn.MultiheadAttention``: ``batch_first`` both ways, ``attn_mask`` (2d, 3d, bool or
    float), ``key_padding_mask``, ``is_causal`` (with its ``attn_mask``), ``bias``,
    ``add_bias_kv``, ``add_zero_attn``, ``kdim``/``vdim``, attention weights as an output."""

    needs_output = False
    differentiable = False  # the projections are recomputed from detached weights

    def batch_axis(self, module: nn.MultiheadAttention) -> int:
        return 0 if module.batch_first else 1

    def param_names(self, module: nn.MultiheadAttention) -> list[str]:
        return [n for n, p in module.named_parameters() if p.requires_grad]

    def subsample(self, module: nn.MultiheadAttention, io: IO, g: Any, idx: list[int]):
        """Pick ``idx`` in the sequences (batch axis), the key padding mask and the gradients."""
        grads = g if isinstance(g, tuple) else (g,)
        index = torch.tensor(idx, device=grads[0].device)
        ax = self.batch_axis(module)
        args = _call_args(io)
        inputs = tuple(args[a].index_select(ax, index) for a in _ARGS[:3])
        kwargs = {k: v for k, v in args.items() if k not in _ARGS[:3]}
        if kwargs.get("key_padding_mask") is not None:
            kwargs["key_padding_mask"] = kwargs["key_padding_mask"].index_select(0, index)
        sub = [grads[0].index_select(ax, index)]
        sub += [t.index_select(0, index) for t in grads[1:]]  # weights: batch first always
        return IO(inputs, None, kwargs), sub[0] if len(sub) == 1 else tuple(sub)

    def check(self, module: nn.MultiheadAttention, io: IO, request: Request | None) -> None:
        where = f"{request.name} on {module}"
        args = _call_args(io)
        if args["query"].dim() != 3:
            raise NotImplementedError(
                f"{where}: unbatched input of shape {tuple(args['query'].shape)} has no batch "
                "axis. Add one (x.unsqueeze(0) with batch_first=True)."
            )
        if module.training and module.dropout > 0:
            raise NotImplementedError(
                f"{where}: attention dropout={module.dropout} in train mode draws masks that "
                "cannot be recovered in backward. Call module.eval() or set dropout=0."
            )
        mask = args.get("attn_mask")
        if mask is not None and mask.dim() == 3 and request.second_order:
            raise NotImplementedError(
                f"{where}: a per-sample (3d) attn_mask is supported for first-order extensions "
                "only. Use a 2d attn_mask and key_padding_mask for second-order extensions."
            )
        if args.get("is_causal") and mask is None:
            raise ValueError(f"{where}: is_causal=True needs its attn_mask (as in torch).")

    def _grads(self, module: nn.MultiheadAttention, io: IO, g: Any) -> tuple[dict, None, dict]:
        if "grads" not in io.cache:
            grads = g if isinstance(g, tuple) else (g,)
            io.cache["grads"] = _backward(module, io, grads, first_order=True)
        return io.cache["grads"]

    def batch_grad(self, module, io: IO, g: Any, name: str, out: Tensor | None = None) -> Tensor:
        """``sum_l d[n, l] a[n, l]^T`` ``[n, *param]`` from the recomputed deltas."""
        return self._grads(module, io, g)[0][name]

    def grad(self, module: nn.MultiheadAttention, io: IO, g: Any, name: str) -> Tensor:
        return self.batch_grad(module, io, g, name).sum(0)

    def _backprop(self, module: nn.MultiheadAttention, io: IO, mat: Tensor) -> tuple:
        """``_backward`` vmapped over the columns of ``mat`` ``[v, *out]``, memoised per ``mat``
        (the stream asks for the input and every parameter with the same tensor)."""
        key = ("mat", id(mat), tuple(mat.shape))
        hit = io.cache.get(key)
        if hit is None or hit[0] is not mat:  # holding mat keeps its id from being reused
            hit = io.cache[key] = (mat, vmap(lambda m: _backward(module, io, (m,)))(mat))
        return hit[1]

    def jac_t_mat_prod(self, module: nn.MultiheadAttention, io: IO, mat: Tensor) -> tuple:
        """``J^T mat`` ``[v, *out] -> ([v, *query], [v, *key], [v, *value])``."""
        return self._backprop(module, io, mat)[1]

    def param_jac_t_mat_prod(
        self, module: nn.MultiheadAttention, io: IO, mat: Tensor, name: str, sum_batch=True
    ) -> Tensor:
        """``[v, *out] -> [v, (n,) *param]`` (per-sample gradients for every column)."""
        out = self._backprop(module, io, mat)[0][name]
        return out.sum(1) if sum_batch else out

    def param_jac_mat_prod(
        self, module: nn.MultiheadAttention, io: IO, mat: Tensor, name: str
    ) -> Tensor:
        """``J_theta mat`` ``[v, *param] -> [v, *out]`` by forward-mode AD of the explicit
        attention (torch's fused kernel, used with ``need_weights=False``, has none)."""
        explicit, param = _Explicit(module), module.get_parameter(name).detach()

        def forward(p: Tensor) -> Tensor:
            return functional_call(explicit, {f"mha.{name}": p}, io.inputs, io.kwargs)[0]

        with torch.no_grad():
            return vmap(lambda v: jvp(forward, (param,), (v,))[1])(mat)

    def kron_factors(
        self, module: nn.MultiheadAttention, io: IO, mat: Tensor, name: str
    ) -> list[tuple[Tensor, Tensor]] | None:
        """Kronecker blocks ``[(a [1, n, 1, i, s], b [v, n, 1, o, s])]`` of a projection weight,
        as ``nn.Linear`` on ``[n, L|S, E]`` gives them: ``a`` the projection's input, ``b`` what
        flows to its output (for q/k/v: ``mat`` pulled back through the attention core); one
        block per row block of ``in_proj_weight`` (q, k, v). None for the other parameters."""
        if name not in _KRON_BLOCKS:
            return None
        if "proj_inputs" not in io.cache:
            args = _call_args(io)
            xs, proj, biases = _projections(module, args)
            core_out = _core(module, args, *proj, *(biases or (None, None)))[0]
            io.cache["proj_inputs"] = dict(zip("qkvo", (*xs, core_out)))
        inputs, deltas = io.cache["proj_inputs"], self._backprop(module, io, mat)[2]
        return [
            _LINEAR.factors(module, IO((inputs[c],), None), deltas[c]) for c in _KRON_BLOCKS[name]
        ]

    def _axes(self, module: nn.MultiheadAttention, io: IO) -> tuple[list[int], list[int]]:
        ax = self.batch_axis(module)
        return [ax if i < 3 else 0 for i in range(len(io.inputs))], [ax, 0]

    def residual_factors(self, module: nn.MultiheadAttention, io: IO, g: Any) -> list:
        """Softmax attention is curved in query and key: exact dense per-sample blocks."""
        return residual_factors_autograd(_Explicit(module), io, g, self._axes(module, io)[0])

    def param_residual_diag(
        self, module: nn.MultiheadAttention, io: IO, g: Any, name: str, sum_batch: bool = True
    ) -> Tensor | None:
        """Attention is bilinear-then-softmax in ``Wq``, ``Wk``: their own second derivatives
        (exact, by torch.func); ``Y`` is linear in ``Wv``, ``bias_v`` and ``out_proj``."""
        if _linear_in(name):
            return None
        if not sum_batch and io.kwargs.get("key_padding_mask") is not None:
            io = _move_mask(io)
        in_axes, out_axes = self._axes(module, io)
        return param_residual_diag_autograd(
            _Explicit(module), io, g, f"mha.{name}", sum_batch, in_axes, out_axes
        )

    def param_residual_mat_prod(
        self, module: nn.MultiheadAttention, io: IO, g: Any, name: str, mat: Tensor
    ) -> Tensor | None:
        """Nonzero for ``Wq``, ``Wk`` and their biases, as ``param_residual_diag``."""
        if _linear_in(name):
            return None
        return param_residual_mat_prod_autograd(_Explicit(module), io, g, f"mha.{name}", mat)


def _move_mask(io: IO) -> IO:
    """The key padding mask as the fourth positional input, so per-sample vmaps pick it."""
    args = _call_args(io)
    kwargs = {k: v for k, v in io.kwargs.items() if k not in _ARGS}
    kwargs.update({k: args[k] for k in ("need_weights", "attn_mask") if k in args})
    return IO(tuple(args[a] for a in _ARGS[:4]), None, kwargs)

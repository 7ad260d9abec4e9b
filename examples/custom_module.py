"""Custom layers: support your own ``nn.Module`` in two ways, checked against autograd.

The layer multiplies its input by a learnable scalar, ``out = x * weight``.

(a) Register a ``Rule`` for its type (its Jacobian products, one class): every extension works.
(b) BackPACK's per-extension API: ``ext.set_module_extension(ScaleModule, handler)`` with a
    handler that computes that one extension's quantity (here ``BatchGrad`` and ``DiagGGNExact``).

Run: ``python examples/custom_module.py``
"""

import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

import backpack
from backpack import backpack as backpack_ctx
from backpack import extend
from backpack.extensions import BatchGrad, DiagGGNExact
from backpack.extensions.firstorder.base import FirstOrderModuleExtension
from backpack.extensions.module_extension import ModuleExtension


class ScaleModule(nn.Module):
    """``x * weight`` with a learnable scalar ``weight`` of shape ``[1]``."""

    def __init__(self, weight: float = 2.0):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([weight]))

    def forward(self, x):
        return x * self.weight


# (a) A rule: the layer's Jacobian products (shapes: mat [v, n, *out]). Rules match the exact
# type, so register a subclass here to keep ScaleModule itself for part (b).
class RuleScale(ScaleModule):
    """The same layer, supported by a rule."""


@backpack.register(RuleScale)
class RuleScaleRule(backpack.Rule):
    needs_output = False  # the math needs only the input

    def jac_t_mat_prod(self, module, io, mat):
        return mat * module.weight  # d out / d x = weight

    def param_jac_t_mat_prod(self, module, io, mat, name, sum_batch=True):
        out = (mat * io.input0).flatten(2).sum(2, keepdim=True)  # d out / d weight = x
        return out.sum(1) if sum_batch else out  # [v, (n,) 1]


# (b) Handlers, one per extension. Each parameter function gets (ext, module, g_inp, g_out,
# bp_quantities); module.input0 and module.output are the forward call's tensors.
class ScaleModuleBatchGrad(FirstOrderModuleExtension):
    """Per-sample gradients of ``weight``: ``sum_features g_n * x_n`` ``[N, 1]``."""

    def __init__(self):
        super().__init__(params=["weight"])

    def weight(self, ext, module, g_inp, g_out, bp_quantities):
        return (g_out[0] * module.input0).flatten(1).sum(1, keepdim=True)


class ScaleModuleDiagGGNExact(ModuleExtension):
    """GGN diagonal of ``weight`` from the square-root factor ``S [v, n, *out]``."""

    def __init__(self):
        super().__init__(params=["weight"])

    def backpropagate(self, ext, module, g_inp, g_out, bp_quantities):
        return bp_quantities * module.weight  # J^T S, passed on to the previous layer

    def weight(self, ext, module, g_inp, g_out, bp_quantities):
        jac_t_s = (bp_quantities * module.input0).flatten(2).sum(2)  # [v, n]
        return jac_t_s.square().sum((0, 1)).unsqueeze(0)  # [1]


def make_model(scale_cls: type) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), scale_cls(), nn.Tanh(), nn.Linear(3, 2)).double()


def autograd_references(model, lossfunc, X, y):
    """Per-sample gradients and the GGN diagonal ``diag(J^T H J)`` by torch.func."""
    params = {k: p.detach() for k, p in model.named_parameters()}

    def f(p, x):
        return functional_call(model, p, (x,))

    def sample_loss(p, xn, yn):  # sample n's share of the mean loss
        return lossfunc(f(p, xn[None]), yn[None]) / X.shape[0]

    grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, X, y)
    out = f(params, X)
    jac = jacrev(f)(params, X)  # name -> [n, c, *p]
    hess = hessian(lambda o: lossfunc(o, y))(out).flatten(0, 1).flatten(1)  # [nc, nc]
    ggn = {}
    for k, j in jac.items():
        j = j.flatten(0, 1).flatten(1)  # [nc, P]
        ggn[k] = torch.einsum("ap,ab,bp->p", j, hess, j).view_as(params[k])
    return grads, ggn


def check(title, model, extensions):
    lossfunc = extend(nn.CrossEntropyLoss())
    torch.manual_seed(1)
    X, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 2, (8,))
    grads, ggn = autograd_references(model, lossfunc, X, y)
    extend(model)
    with backpack_ctx(*extensions):
        lossfunc(model(X), y).backward()
    print(title)
    for name, p in model.named_parameters():
        err_grad = (p.grad_batch - grads[name]).abs().max().item()
        err_ggn = (p.diag_ggn_exact - ggn[name]).abs().max().item()
        print(f"  {name:<9} grad_batch err {err_grad:.1e}   diag_ggn_exact err {err_ggn:.1e}")
        assert err_grad < 1e-10 and err_ggn < 1e-10
    assert not hasattr(model[1], "input0") and not hasattr(model[1], "output")  # no leftovers


check("(a) Rule registered for RuleScale", make_model(RuleScale), [BatchGrad(), DiagGGNExact()])

batch_grad, diag_ggn = BatchGrad(), DiagGGNExact()
batch_grad.set_module_extension(ScaleModule, ScaleModuleBatchGrad())
diag_ggn.set_module_extension(ScaleModule, ScaleModuleDiagGGNExact())
check("(b) set_module_extension for ScaleModule", make_model(ScaleModule), [batch_grad, diag_ggn])
print("both match autograd")

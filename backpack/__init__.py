"""backpack: more quantities from one backward pass (per-sample gradients, curvature, ...).

from backpack import backpack, extend
from backpack.extensions import BatchGrad
model, lossfunc = extend(model), extend(lossfunc)
with backpack(BatchGrad()):
lossfunc(model(X), y).backward()
p.grad_batch  # [N, *p.shape]
"""

from backpack import derivatives  # noqa: F401  (registers the built-in rules)
from backpack._context import backpack
from backpack._state import disable, set_strict
from backpack.custom_module.graph_utils import convert_module_to_backpack
from backpack.derivatives.base import IO, Rule
from backpack.engine.hooks import extend, memory_cleanup
from backpack.registry import register

__all__ = [
    "backpack",
    "disable",
    "extend",
    "register",
    "set_strict",
    "Rule",
    "IO",
    "convert_module_to_backpack",
    "memory_cleanup",
]

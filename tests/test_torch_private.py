"""The private PyTorch APIs backpack relies on (``backpack._torch_private``) still behave as it
assumes. A failure here means a torch release changed one: fix the wrapper, not the callers."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import backpack._torch_private as tp

ROOT = Path(__file__).resolve().parents[1] / "backpack"


def test_functorch_transform_and_wrapped_tensors():
    assert not tp.in_functorch_transform()
    seen = []

    def f(x):
        seen.append((tp.in_functorch_transform(), tp.is_functorch_wrapped(x)))
        return x * 2

    torch.func.vmap(f)(torch.ones(3, 2))
    assert seen == [(True, True)]
    assert not tp.is_functorch_wrapped(torch.ones(2))


def test_graph_task_current_node_and_end_callback():
    x = torch.ones(2, requires_grad=True)
    y = x * 3
    out = y.sum()
    log = []

    def pre_hook(grads):
        node = tp.current_node()
        log.append(("node", node is y.grad_fn, tp.graph_task_id()))
        log.append(("will", tp.will_execute(y.grad_fn)))
        tp.queue_at_backward_end(lambda: log.append(("end", tp.graph_task_id())))

    y.grad_fn.register_prehook(pre_hook)
    assert tp.graph_task_id() == -1 and tp.current_node() is None
    out.backward()
    (_, is_node, task), (_, will), (end, end_task) = log
    assert is_node and will and task >= 0 and end == "end" and end_task == task


def test_will_execute_is_false_for_unreached_nodes():
    x = torch.ones(2, requires_grad=True)
    a, b = x * 2, x * 3
    seen = []
    a.grad_fn.register_prehook(lambda g: seen.append(tp.will_execute(b.grad_fn)))
    a.sum().backward(inputs=[x])
    assert seen == [False]


def test_storage_use_count_and_refcount():
    storage = torch.UntypedStorage(16)
    assert tp.storage_use_count(storage) == 1  # the workspace's test: no tensor uses it
    t = torch.empty(0).set_(storage, 0, (4,))
    del storage
    assert tp.storage_use_count(t.untyped_storage()) == 2  # the tensor and the storage object
    v = t[:2]
    assert tp.storage_use_count(t.untyped_storage()) == 3
    assert tp.view_base(v) is t and tp.view_base(t) is None
    del v
    holder = {"t": t}
    assert tp.refcount(t) == sys.getrefcount(t) == 3  # ``t``, ``holder``, the argument
    del holder


def test_saved_tensors_of_view_and_max_pool_nodes():
    x = torch.randn(3, 4, requires_grad=True)
    assert tp.saved_self_sizes(x.view(12).grad_fn) == (3, 4)
    assert tp.saved_self_sizes((x * 2).grad_fn) is None
    img = torch.randn(1, 1, 4, 4, requires_grad=True)
    out = nn.MaxPool2d(2)(img)
    idx = tp.saved_argmax(out.grad_fn)
    assert idx is not None and idx.shape == out.shape
    assert torch.equal(img.flatten(2).gather(2, idx.flatten(2)).view_as(out), out)


def test_softmax_dim_and_hook_dicts_and_ddp_sink():
    with pytest.warns(UserWarning, match="Implicit dimension"):  # torch's, as in nn.Softmax
        assert [tp.softmax_dim("softmax", d) for d in (2, 3, 4)] == [1, 0, 1]
    m = nn.Linear(2, 2)
    handle = m.register_forward_hook(lambda *a, **k: None, with_kwargs=True)
    forward, pre, with_kwargs = tp.forward_hook_dicts(m)
    assert handle.id in forward and handle.id in with_kwargs and not pre
    assert isinstance(tp.DDP_SINK_NODE, type)


def test_saved_indexing_of_select_and_slice_nodes():
    x = torch.randn(2, 4, 5, requires_grad=True)
    assert tp.saved_indexing(x[:, -1].grad_fn) == ("select", 1, -1, (2, 4, 5))
    assert tp.saved_indexing(x[..., 1:3].grad_fn) == ("slice", 2, (1, 3, 1), (2, 4, 5))
    assert tp.saved_indexing(x.view(8, 5).grad_fn) is None


def test_mode_steps_aside_and_comes_back():
    seen = []

    class Mode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    x = torch.ones(2)
    with Mode() as mode:
        assert tp.pop_mode_if_top(mode) and not tp.pop_mode_if_top(mode)
        torch.tanh(x)
        assert not seen
        tp.push_mode(mode)
        torch.tanh(x)
        assert seen == [torch.tanh]


def test_private_apis_only_through_the_wrappers():
    private = re.compile(
        r"torch\._C\b|_execution_engine|getrefcount|_get_softmax_dim|_saved_[a-z]|_DDPSink"
        r"|\._base\b|\._forward_hooks|\._forward_pre_hooks|_functorch\."
    )
    found = [f"{p.relative_to(ROOT.parent)}:{i}: {line.strip()}"
             for p in ROOT.rglob("*.py") if p.name != "_torch_private.py"
             for i, line in enumerate(p.read_text().splitlines(), 1)
             if private.search(line.split("#")[0]) and "``" not in line]  # fmt: skip
    assert not found, "\n".join(found)

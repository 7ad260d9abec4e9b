"""Module-only versions of torch's transformer layers, sharing the original's parameters.

torch's ``nn.TransformerEncoderLayer``/``nn.TransformerDecoderLayer`` add residuals and apply
the activation functionally, so second-order quantities cannot follow them. The versions here
call only modules with rules: residual additions are ``SumModule`` s, the activation a module.
They are registered conversions (``extend(model, use_converter=True)`` applies them); call
``convert_transformer(module)`` directly to convert a layer, stack or ``nn.Transformer``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from backpack.custom_module.branching import SumModule
from backpack.custom_module.conversions import register_conversion

_ACTIVATIONS: dict[Callable, type[nn.Module]] = {F.relu: nn.ReLU, F.gelu: nn.GELU}


def _activation(act: Callable | nn.Module) -> nn.Module:
    if isinstance(act, nn.Module):
        return act
    if act not in _ACTIVATIONS:
        raise NotImplementedError(
            f"convert_transformer: activation {act} is a function without a module equivalent. "
            "Pass the activation as a module (e.g. activation=nn.GELU()) instead."
        )
    return _ACTIVATIONS[act]()


class _Layer(nn.Module):
    """Shared parts of encoder and decoder layers: attention and feed-forward blocks."""

    def __init__(self, layer: nn.Module, n_blocks: int):
        super().__init__()
        self.norm_first = layer.norm_first
        for name in ("self_attn", "linear1", "dropout", "linear2", "norm1", "norm2"):
            setattr(self, name, getattr(layer, name))
        self.activation = _activation(layer.activation)
        self.adds = nn.ModuleList(SumModule() for _ in range(n_blocks))

    def _block(self, i: int, x: Tensor, norm: nn.Module, branch: Callable[[Tensor], Tensor]):
        """``x + branch(norm(x))`` (pre-norm) or ``norm(x + branch(x))`` (post-norm)."""
        if self.norm_first:
            return self.adds[i](x, branch(norm(x)))
        return norm(self.adds[i](x, branch(x)))

    def _sa(self, x: Tensor, mask: Tensor | None, kpm: Tensor | None, causal: bool, drop):
        out = self.self_attn(
            x, x, x, attn_mask=mask, key_padding_mask=kpm, need_weights=False, is_causal=causal
        )[0]
        return drop(out)

    def _ff(self, x: Tensor, drop: nn.Module) -> Tensor:
        return drop(self.linear2(self.dropout(self.activation(self.linear1(x)))))


class TransformerEncoderLayer(_Layer):
    """``nn.TransformerEncoderLayer`` (``norm_first`` both ways) built from modules."""

    def __init__(self, layer: nn.TransformerEncoderLayer):
        super().__init__(layer, 2)
        self.dropout1, self.dropout2 = layer.dropout1, layer.dropout2

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        sa = lambda x: self._sa(x, src_mask, src_key_padding_mask, is_causal, self.dropout1)  # noqa: E731
        x = self._block(0, src, self.norm1, sa)
        return self._block(1, x, self.norm2, lambda x: self._ff(x, self.dropout2))


class TransformerDecoderLayer(_Layer):
    """``nn.TransformerDecoderLayer`` (``norm_first`` both ways) built from modules."""

    def __init__(self, layer: nn.TransformerDecoderLayer):
        super().__init__(layer, 3)
        self.multihead_attn, self.norm3 = layer.multihead_attn, layer.norm3
        self.dropout1, self.dropout2, self.dropout3 = layer.dropout1, layer.dropout2, layer.dropout3

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
    ) -> Tensor:
        def mha(x: Tensor) -> Tensor:
            out = self.multihead_attn(
                x,
                memory,
                memory,
                attn_mask=memory_mask,
                key_padding_mask=memory_key_padding_mask,
                is_causal=memory_is_causal,
                need_weights=False,
            )[0]
            return self.dropout2(out)

        sa = lambda x: self._sa(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal, self.dropout1)  # noqa: E731
        x = self._block(0, tgt, self.norm1, sa)
        x = self._block(1, x, self.norm2, mha)
        return self._block(2, x, self.norm3, lambda x: self._ff(x, self.dropout3))


class _Stack(nn.Module):
    """Converted layers of ``nn.TransformerEncoder``/``nn.TransformerDecoder`` and the final
    norm; ``forward`` passes the positional arguments and keywords to every layer."""

    def __init__(self, stack: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList(convert_transformer(m) for m in stack.layers)
        self.norm = stack.norm

    def _run(self, x: Tensor, *args, **kwargs) -> Tensor:
        for layer in self.layers:
            x = layer(x, *args, **kwargs)
        return x if self.norm is None else self.norm(x)


class TransformerEncoder(_Stack):
    """``nn.TransformerEncoder`` built from converted layers."""

    def forward(
        self,
        src: Tensor,
        mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool | None = None,
    ) -> Tensor:
        return self._run(src, mask, src_key_padding_mask, bool(is_causal))


class TransformerDecoder(_Stack):
    """``nn.TransformerDecoder`` built from converted layers."""

    def forward(self, tgt: Tensor, memory: Tensor, *args, **kwargs) -> Tensor:
        return self._run(tgt, memory, *args, **kwargs)


class Transformer(nn.Module):
    """``nn.Transformer``: converted encoder and decoder."""

    def __init__(self, model: nn.Transformer):
        super().__init__()
        self.encoder = convert_transformer(model.encoder)
        self.decoder = convert_transformer(model.decoder)

    def forward(
        self,
        src: Tensor,
        tgt: Tensor,
        src_mask: Tensor | None = None,
        tgt_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        src_is_causal: bool | None = None,
        tgt_is_causal: bool | None = None,
        memory_is_causal: bool = False,
    ) -> Tensor:
        memory = self.encoder(src, src_mask, src_key_padding_mask, src_is_causal)
        return self.decoder(
            tgt,
            memory,
            tgt_mask,
            memory_mask,
            tgt_key_padding_mask,
            memory_key_padding_mask,
            bool(tgt_is_causal),
            memory_is_causal,
        )


_CONVERTED = {
    nn.TransformerEncoderLayer: TransformerEncoderLayer,
    nn.TransformerDecoderLayer: TransformerDecoderLayer,
    nn.TransformerEncoder: TransformerEncoder,
    nn.TransformerDecoder: TransformerDecoder,
    nn.Transformer: Transformer,
}


@register_conversion(*_CONVERTED)
def convert_transformer(module: nn.Module) -> nn.Module:
    """The module-only equivalent of a torch transformer layer, stack or ``nn.Transformer``,
    sharing its parameters (and modules)."""
    return _CONVERTED[type(module)](module)

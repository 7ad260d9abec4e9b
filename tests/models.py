"""Tiny models for the converter tests: ResNet blocks, an LSTM classifier, a small U-Net, a
ViT-style classifier and a GPT-style language model."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from backpack.custom_module.permute import Permute
from backpack.custom_module.position import PositionalEmbedding


class BasicBlock(nn.Module):
    """ResNet basic block: conv-bn-relu-conv-bn, ``out += identity`` (1x1 downsample)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """ResNet bottleneck block: 1x1 -> 3x3 -> 1x1 convs, identity through a 1x1 conv."""

    def __init__(self, c_in: int, width: int, c_out: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, c_out, 1, bias=False), nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out)
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += self.downsample(x)
        return self.relu(out)


class ResNet(nn.Module):
    """Stem conv, one block, average pool, ``torch.flatten``, linear head (eval-mode BN)."""

    def __init__(self, block: str = "basic", classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.block = BasicBlock(3, 4, 2) if block == "basic" else Bottleneck(3, 2, 4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.conv(x))
        return self.fc(torch.flatten(self.pool(self.block(x)), 1))


class LSTMClassifier(nn.Module):
    """Embedding -> LSTM -> last step -> Linear."""

    def __init__(self, vocab: int = 7, classes: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, 4)
        self.lstm = nn.LSTM(4, 3, batch_first=True)
        self.fc = nn.Linear(3, classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(self.emb(x))
        return self.fc(out[:, -1, :])


class UNet(nn.Module):
    """One down/up level with a ``torch.cat`` skip connection."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.enc = nn.Conv2d(2, 3, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.mid = nn.Conv2d(3, 3, 3, padding=1)
        self.up = nn.ConvTranspose2d(3, 3, 2, stride=2)
        self.dec = nn.Conv2d(6, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 4 * 4, classes)

    def forward(self, x: Tensor) -> Tensor:
        e = torch.tanh(self.enc(x))
        m = torch.tanh(self.mid(self.pool(e)))
        d = nn.functional.relu(self.dec(torch.cat([e, self.up(m)], 1)), inplace=True)
        return self.fc(d.view(d.size(0), -1) * 0.5)


def _encoder(dim: int, heads: int, layers: int, norm: bool) -> nn.TransformerEncoder:
    """Pre-norm GELU encoder layers without dropout (batch first), final LayerNorm if ``norm``."""
    layer = nn.TransformerEncoderLayer(
        dim, heads, 2 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
    )
    final = nn.LayerNorm(dim) if norm else None
    return nn.TransformerEncoder(layer, layers, norm=final, enable_nested_tensor=False)


class ViT(nn.Module):
    """Patches by a strided Conv2d -> tokens ``[n, L, E]`` -> learned positions -> pre-norm
    encoder -> LayerNorm -> mean over tokens (AdaptiveAvgPool1d) -> Linear."""

    def __init__(self, image=4, channels=2, patch=2, dim=8, heads=2, layers=1, classes=3):
        super().__init__()
        self.patches = nn.Conv2d(channels, dim, patch, stride=patch)
        self.tokens = nn.Sequential(nn.Flatten(2), Permute(0, 2, 1))  # [n, E, L] -> [n, L, E]
        self.pos = PositionalEmbedding((image // patch) ** 2, dim)
        self.encoder = _encoder(dim, heads, layers, norm=True)
        self.pool = nn.Sequential(Permute(0, 2, 1), nn.AdaptiveAvgPool1d(1), nn.Flatten())
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.encoder(self.pos(self.tokens(self.patches(x))))))


class GPT(nn.Module):
    """Token embedding + learned positions -> causal pre-norm encoder -> LayerNorm -> Linear
    head ``[n, L, V]`` -> logits ``[n, V, L]`` for CrossEntropyLoss over positions."""

    def __init__(self, vocab=7, length=4, dim=8, heads=2, layers=1):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = PositionalEmbedding(length, dim)
        self.blocks = _encoder(dim, heads, layers, norm=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)
        self.logits = Permute(0, 2, 1)
        causal = torch.ones(length, length, dtype=torch.bool).triu(1)  # True: not allowed
        self.register_buffer("causal", causal, persistent=False)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.blocks(self.pos(self.tok(idx)), mask=self.causal, is_causal=True)
        return self.logits(self.head(self.norm(x)))


def make(name: str) -> tuple[nn.Module, torch.Tensor]:
    """(model in eval mode, float64 input of 3 samples)."""
    torch.manual_seed(0)
    if name == "lstm":
        return LSTMClassifier().double().eval(), torch.randint(0, 7, (3, 5))
    model = {"resnet_basic": lambda: ResNet("basic"), "resnet_bottleneck": lambda: ResNet("b"),
             "unet": UNet}[name]().double().eval()  # fmt: skip
    for m in model.modules():  # non-trivial running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return model, torch.randn(3, 2, 4, 4, dtype=torch.float64)


MODELS = ["resnet_basic", "resnet_bottleneck", "lstm", "unet"]

"""Helpers of BackPACK's documentation examples: MNIST from a local cache, and a reference GGN
diagonal from GGN-vector products.

MNIST is never downloaded: the loaders read the raw files of torchvision's layout,
``<root>/MNIST/raw/train-images-idx3-ubyte[.gz]`` and ``train-labels-idx1-ubyte[.gz]``, with
``<root>`` the environment variable ``BACKPACK_DATA`` or ``./data`` (BackPACK's location), and
raise ``FileNotFoundError`` saying how to fill the cache when they are absent.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from backpack.hessianfree.ggnvp import ggn_vector_product_from_plist
from backpack.utils.convert_parameters import vector_to_parameter_list

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # BackPACK's (torchvision's usual) normalisation
_FILES = {"images": "train-images-idx3-ubyte", "labels": "train-labels-idx1-ubyte"}


def mnist_root() -> Path:
    """The cache folder: ``$BACKPACK_DATA`` or ``./data``."""
    return Path(os.environ.get("BACKPACK_DATA", "data"))


def _read_idx(stem: str) -> Tensor:
    """An IDX file: magic (``0, 0, 8`` for uint8, then the number of dims), big-endian
    sizes, the data.

    Raises:
        FileNotFoundError: if the file is missing.

    Returns:
        The data as a tensor of the stored sizes.
    """
    raw = mnist_root() / "MNIST" / "raw"
    for path in (raw / stem, raw / f"{stem}.gz"):
        if path.is_file():
            with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
                data = f.read()
            ndim = data[3]
            sizes = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
            return torch.frombuffer(bytearray(data[4 + 4 * ndim :]), dtype=torch.uint8).view(sizes)
    raise FileNotFoundError(
        f"backpack.utils.examples: MNIST file {raw / stem}[.gz] not found (this library never "
        "downloads). Copy MNIST's raw files there, e.g. from a machine with network access: "
        "python -c \"import torchvision; torchvision.datasets.MNIST('data', download=True)\" "
        "and copy data/MNIST, or set BACKPACK_DATA to the folder that holds MNIST/raw."
    )


def load_mnist_dataset() -> TensorDataset:
    """MNIST's training set: images ``[60000, 1, 28, 28]`` scaled to ``[0, 1]`` and normalised
    by mean 0.1307 and std 0.3081, labels ``[60000]`` (int64).

    Returns:
        A ``TensorDataset`` of images and labels.
    """
    images = (_read_idx(_FILES["images"]).unsqueeze(1).float() / 255 - MNIST_MEAN) / MNIST_STD
    return TensorDataset(images, _read_idx(_FILES["labels"]).long())


def get_mnist_dataloader(batch_size: int = 64, shuffle: bool = True) -> DataLoader:
    """A ``DataLoader`` over ``load_mnist_dataset()``."""
    return DataLoader(load_mnist_dataset(), batch_size=batch_size, shuffle=shuffle)


def load_one_batch_mnist(
    batch_size: int = 64, shuffle: bool = True, flat: bool = False
) -> tuple[Tensor, Tensor]:
    """One batch ``(X [B, 1, 28, 28], y [B])``; ``flat``: ``X [B, 784]``."""
    X, y = next(iter(get_mnist_dataloader(batch_size, shuffle)))
    return (X.flatten(1) if flat else X), y


def autograd_diag_ggn_exact(
    X: Tensor, y: Tensor, model: nn.Module, loss_function: nn.Module, idx: list[int] | None = None
) -> Tensor:
    """Reference GGN diagonal ``[D]`` over the trainable parameters of ``model`` (flattened and
    concatenated in ``model.parameters()`` order), one GGN-vector product ``G e_i`` per entry
    ``i``: slow, for tests. ``idx``: only those entries, ``[len(idx)]``.

    Returns:
        ``[D]``, or ``[len(idx)]`` with ``idx``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    output = model(X)
    loss = loss_function(output, y)
    numel = sum(p.numel() for p in params)
    diag = []
    for i in range(numel) if idx is None else idx:
        e_i = torch.zeros(numel, dtype=output.dtype, device=output.device)
        e_i[i] = 1.0
        v = vector_to_parameter_list(e_i, params)
        column = ggn_vector_product_from_plist(loss, output, params, v)
        diag.append(torch.cat([c.flatten() for c in column])[i])
    return torch.stack(diag)

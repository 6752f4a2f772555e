"""Readers for the device-resident datasets: each turns a :class:`DataConfig` into raw tensors.

A reader returns whole splits as CPU tensors, images ``(n, C, H, W)`` (uint8, or float32 where
the values are not bytes) and labels int64 ``(n,)``. Splitting, normalisation, augmentation and
batching happen in :mod:`guidance_tune.data.splits`, the same way for every dataset. Readers are
found by name in :data:`READERS`, so adding a dataset is one decorated function.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from guidance_tune.config import DataConfig
from guidance_tune.data.files import (
    CIFAR_FILES,
    fashion_mnist_files,
    require_cifar,
    require_fashion_mnist,
)

STAMP_SIZE = 5


@dataclass
class RawData:
    """The official splits of a dataset; ``test_*`` is None where there is no test split."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor | None
    test_labels: Tensor | None
    num_classes: int


Reader = Callable[[DataConfig], RawData]
READERS: dict[str, Reader] = {}


def register_reader(name: str) -> Callable[[Reader], Reader]:
    def add(reader: Reader) -> Reader:
        READERS[name] = reader
        return reader

    return add


@register_reader("synthetic")
def read_synthetic(config: DataConfig) -> RawData:
    """Class = one of ``synthetic_classes`` fixed random +-1 5x5 stamps, pasted at a uniform
    random position and amplitude on Gaussian noise. Where the stamp sits carries no
    information, so a translation-equivariant network has an edge over one that must learn
    each position. The test split is a further quarter drawn with the same stamps."""
    generator = torch.Generator().manual_seed(config.split_seed)
    shape = (config.synthetic_classes, STAMP_SIZE, STAMP_SIZE)
    stamps = torch.randint(0, 2, shape, generator=generator).float() * 2 - 1
    train = _draw_synthetic(stamps, config.synthetic_samples, config.synthetic_size, generator)
    test = _draw_synthetic(stamps, config.synthetic_samples // 4, config.synthetic_size, generator)
    return RawData(*train, *test, num_classes=config.synthetic_classes)


def _draw_synthetic(
    stamps: Tensor, n: int, size: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Vectorised pasting: one advanced-indexing write places every stamp. Returns
    images ``(n, 1, size, size)`` float32 and exactly balanced labels ``(n,)``."""
    labels = torch.arange(n)[torch.randperm(n, generator=generator)] % len(stamps)
    top, left = torch.randint(0, size - STAMP_SIZE + 1, (2, n, 1), generator=generator)
    amplitude = 0.75 + 0.75 * torch.rand(n, 1, 1, generator=generator)
    images = 0.5 * torch.randn(n, size, size, generator=generator)
    offsets = torch.arange(STAMP_SIZE)
    rows, cols = (top + offsets)[:, :, None], (left + offsets)[:, None, :]
    images[torch.arange(n)[:, None, None], rows, cols] += amplitude * stamps[labels]
    return images.unsqueeze(1), labels


@register_reader("digits")
def read_digits(config: DataConfig) -> RawData:
    """scikit-learn's 8x8 digits (ships with sklearn); no official test split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    return RawData(images, torch.as_tensor(digits.target, dtype=torch.int64), None, None, 10)


_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST format): 2 zero bytes, a type code, the number of
    dimensions, big-endian uint32 sizes, then the values in C order."""
    with gzip.open(path, "rb") as stream:
        data = stream.read()
    zeros, code, ndim = struct.unpack_from(">HBB", data)
    if zeros != 0 or code not in _IDX_TYPES:
        raise ValueError(f"{path} is not an IDX file (header {data[:4].hex()})")
    shape = struct.unpack_from(f">{ndim}I", data, 4)
    values = np.frombuffer(data, dtype=_IDX_TYPES[code], offset=4 + 4 * ndim)
    return values.reshape(shape)


@register_reader("fashion_mnist")
def read_fashion_mnist(config: DataConfig) -> RawData:
    require_fashion_mnist(config)  # config.root set by DataConfig: DEFAULT_DATA_ROOTS
    splits = []
    for files in fashion_mnist_files(config.root):
        images, labels = (torch.from_numpy(read_idx(path).copy()) for path in files)
        splits += [images.unsqueeze(1), labels.long()]
    return RawData(*splits, num_classes=10)


# What a CIFAR batch calls its labels and how many there are, and where to download it from.
_CIFAR_LABELS = {"cifar10": ("labels", 10, "CIFAR10"), "cifar100": ("fine_labels", 100, "CIFAR100")}


def _read_cifar_batch(path: Path, label_key: str) -> tuple[Tensor, Tensor]:
    """One pickle batch of torchvision's on-disk format: ``data`` rows of 3072 bytes, CHW."""
    with open(path, "rb") as stream:
        entry = pickle.load(stream, encoding="latin1")
    images = torch.from_numpy(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
    return images, torch.as_tensor(entry[label_key], dtype=torch.int64)


def _read_cifar(config: DataConfig) -> RawData:
    """The pickle batches are read directly rather than through torchvision's dataset class,
    whose md5 check rejects any other copy of the files; torchvision is used to download."""
    label_key, num_classes, dataset_class = _CIFAR_LABELS[config.name]
    paths = CIFAR_FILES[config.name].paths(config.root)  # root set by DataConfig's defaults
    if not all(path.is_file() for path in paths):
        require_cifar(config)  # refused unless data.download
        import torchvision.datasets

        getattr(torchvision.datasets, dataset_class)(str(config.root), train=True, download=True)
    batches = [_read_cifar_batch(path, label_key) for path in paths]
    train_images = torch.cat([images for images, _ in batches[:-1]])
    train_labels = torch.cat([labels for _, labels in batches[:-1]])
    return RawData(train_images, train_labels, *batches[-1], num_classes=num_classes)


register_reader("cifar10")(_read_cifar)
register_reader("cifar100")(_read_cifar)

"""Train/val/test splits and their batches, for every dataset named in :class:`DataConfig`.

Three disjoint splits, always: train (fitted), val (held out of the training set: what a
search, ASHA and the best epoch see) and test (the official test split where the dataset has
one, else a second held-out part). Nothing in a search reads test; it is evaluated once, on the
best-val weights, by the runs that ask for it (``train.evaluate_test``: confirmation and arms).

Small datasets live whole on the training device (as in airbench and hlb-CIFAR10): a batch is
an index tensor, and normalisation, augmentation and resizing run there, vectorised. Only
``imagefolder`` streams from disk through worker processes.

Every random choice of an epoch (order, crops, flips) comes from a generator seeded by
``(seed, epoch)`` alone, so epoch k's batches are the same whether or not the run was
resumed: there is no loader state to checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from guidance_tune.config import ConfigError, DataConfig
from guidance_tune.data.files import require_imagefolder
from guidance_tune.data.readers import READERS
from guidance_tune.data.tasks import CLASSIFICATION, Task

# The token datasets, by where they are made (imported when asked for: they build on this module).
SEQUENCE_LOADERS = {
    "copy_paste": "guidance_tune.data.sequences:load_generated",
    "parity": "guidance_tune.data.sequences:load_generated",
    "text_lm": "guidance_tune.data.text:load_text_lm",
    "grammar_lm": "guidance_tune.data.text:load_grammar_lm",
}


def inputs_of(name: str) -> Literal["images", "tokens"]:
    """What the data set ``name`` feeds a model (:attr:`DataSplits.inputs`), before loading it."""
    return "tokens" if name in SEQUENCE_LOADERS else "images"


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Share:
    """What replica ``index`` of ``count`` data-parallel replicas reads of a split's batches,
    so that none reads (an image folder: decodes) what another one uses: ``by="rows"``, its
    rows ``[index b / count, (index + 1) b / count)`` of every batch (training: the global
    batch split, :func:`~guidance_tune.training.parallel.shard`'s rows), or ``by="batches"``,
    the whole batches ``index, index + count, ...`` (evaluation: scored apart and summed)."""

    index: int = 0
    count: int = 1
    by: Literal["rows", "batches"] = "rows"

    def ranges(
        self, num_samples: int, batch_size: int, drop_last: bool
    ) -> Iterator[tuple[int, int]]:
        """Positions ``[low, high)`` in the epoch's sample order, one pair per batch read."""
        batches = count_batches(num_samples, batch_size, drop_last)
        starts = range(0, batches * batch_size, batch_size)
        if self.by == "batches":
            starts = starts[self.index :: self.count]
        for start in starts:
            low, high = start, min(start + batch_size, num_samples)
            if self.by == "rows" and self.count > 1:
                if (high - low) % self.count:
                    raise ValueError(
                        f"a batch of {high - low} does not split evenly over {self.count} "
                        "replicas: the whole-batch Grams need equal shards"
                    )
                rows = (high - low) // self.count
                low, high = low + self.index * rows, low + (self.index + 1) * rows
            yield low, high


WHOLE = Share()  # a single process reads every row of every batch


class BatchSource(Protocol):
    """One split, batched. ``x``: float32 ``(b, C, H, W)`` normalised, or int64 tokens
    ``(b, T)``, on the source's device; ``y``: int64 ``(b,)``, or ``(b, T)`` for a target per
    position. ``num_batches`` is exactly how many batches ``batches`` yields of the whole
    split; ``share`` is what one data-parallel replica reads of them (:class:`Share`)."""

    num_samples: int

    def num_batches(self, batch_size: int, *, drop_last: bool) -> int: ...

    def digest(self) -> str:
        """A fingerprint of the split's samples and labels: two runs read the same data when
        their digests match (MLflow shows it beside the dataset)."""
        ...

    def batches(
        self,
        batch_size: int,
        *,
        epoch: int,
        seed: int,
        shuffle: bool,
        drop_last: bool,
        share: Share = WHOLE,
    ) -> Iterator[tuple[Tensor, Tensor]]: ...


# Which positions of a token batch ``(b, T)`` are real, not padding: bool ``(b, T)``.
ValidPositions = Callable[[Tensor], Tensor]


@dataclass
class DataSplits:
    """The three splits and the shape models are built for. ``task`` says what is asked of a
    batch (:mod:`.tasks`). ``inputs`` says what a batch is: images, or int64 token sequences
    ``(b, T)``, for which ``in_channels`` is the input vocabulary and ``image_size`` the
    sequence length ``T``. ``valid_positions`` tells padding apart where sequences have it,
    so that guidance compares the same real positions in both networks
    (:mod:`~guidance_tune.guidance.layers`)."""

    train: BatchSource
    val: BatchSource
    test: BatchSource
    in_channels: int
    image_size: int
    num_classes: int
    task: Task = CLASSIFICATION
    inputs: Literal["images", "tokens"] = "images"
    valid_positions: ValidPositions | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One example's shape, as a model takes it."""
        if self.inputs == "images":
            return (self.in_channels, self.image_size, self.image_size)
        return (self.image_size,)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator that depends on ``(seed, epoch)`` only; hashing keeps nearby pairs
    such as (0, 1) and (1, 0) unrelated."""
    digest = hashlib.blake2b(f"{seed},{epoch}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def fingerprint(*tensors: Tensor) -> str:
    """16 hex digits of the tensors' bytes (their shapes and dtypes included)."""
    digest = hashlib.blake2b(digest_size=8)
    for tensor in tensors:
        digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def count_batches(num_samples: int, batch_size: int, drop_last: bool) -> int:
    return num_samples // batch_size if drop_last else -(-num_samples // batch_size)


@dataclass(frozen=True)
class SplitIndices:
    """Sorted indices into the official training set; ``test`` is None where the dataset's
    own test split is the test split."""

    train: Tensor
    val: Tensor
    test: Tensor | None


def split_indices(n: int, config: DataConfig, *, has_test_split: bool) -> SplitIndices:
    """Seeded, disjoint splits of the official training set of size ``n``.

    Without an official test split, ``test_fraction`` of it is held out as test first, then
    ``val_fraction`` as val. ``n_train`` keeps a prefix of the shuffled rest, so a smaller
    subset is contained in a larger one, and val and test do not change with it."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.split_seed))
    n_test = 0 if has_test_split else _held_out(n, config.test_fraction)
    n_val = _held_out(n, config.val_fraction)
    if n_test + n_val >= n:
        raise ConfigError(
            f"data.val_fraction and data.test_fraction leave no training sample of the {n} in "
            f"{config.name}: lower them"
        )
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    if config.n_train is not None:
        if config.n_train > len(train):
            raise ConfigError(
                f"data.n_train {config.n_train} is larger than the {len(train)} training "
                f"samples of {config.name}: lower data.n_train or data.val_fraction"
            )
        train = train[: config.n_train]
    return SplitIndices(
        train.sort().values, val.sort().values, None if has_test_split else test.sort().values
    )


def _held_out(n: int, fraction: float) -> int:
    return max(1, round(n * fraction))


def crop_padding(side: int) -> int:
    """4 px at CIFAR's 32 px (airbench), scaled with the side so 8 px digits move by 1."""
    return max(1, round(side / 8))


def random_crop_flip(images: Tensor, shifts: Tensor, flips: Tensor, padding: int) -> Tensor:
    """Reflect-pad by ``padding``, crop back at offsets ``shifts``, mirror where ``flips``.

    images: (b, C, H, W); shifts: (b, 2) rows/cols offsets in [0, 2 * padding]; flips: (b,)
    bool. One gather crops the whole batch: no loop over images."""
    b, c, h, w = images.shape
    padded = F.pad(images, (padding,) * 4, mode="reflect")
    rows = shifts[:, :1] + torch.arange(h, device=images.device)
    cols = shifts[:, 1:] + torch.arange(w, device=images.device)
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    channel = torch.arange(c, device=images.device)[None, :, None, None]
    cropped = padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]
    return torch.where(flips[:, None, None, None], cropped.flip(-1), cropped)


class TensorSource:
    """A split held whole on the device: images ``(n, C, H, W)`` (uint8 or float), labels
    ``(n,)``, and the training split's per-channel ``mean``/``std`` ``(C,)``."""

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        stats: tuple[Tensor, Tensor],
        *,
        image_size: int | None,
        augment: bool,
    ) -> None:
        self.images, self.labels = images, labels
        self.mean, self.std = (s.to(images.device).view(1, -1, 1, 1) for s in stats)
        self.image_size, self.augment = image_size, augment
        self.num_samples = len(labels)

    def digest(self) -> str:
        return fingerprint(self.images, self.labels)

    def num_batches(self, batch_size: int, *, drop_last: bool) -> int:
        return count_batches(self.num_samples, batch_size, drop_last)

    def batches(
        self,
        batch_size: int,
        *,
        epoch: int,
        seed: int,
        shuffle: bool,
        drop_last: bool,
        share: Share = WHOLE,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        n, device = self.num_samples, self.images.device
        generator = epoch_generator(seed, epoch)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        padding = crop_padding(self.images.shape[-1])
        shifts = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator).to(device)
        flips = (torch.rand(n, generator=generator) < 0.5).to(device)
        order = order.to(device)
        for low, high in share.ranges(n, batch_size, drop_last):
            index = order[low:high]
            images = (self.images[index].float() - self.mean) / self.std
            if self.augment:
                window = slice(low, high)
                images = random_crop_flip(images, shifts[window], flips[window], padding)
            yield self._resize(images), self.labels[index]

    def _resize(self, images: Tensor) -> Tensor:
        size = self.image_size
        if size is None or images.shape[-2:] == (size, size):
            return images
        return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)


def channel_stats(images: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std ``(C,)`` of images ``(n, C, H, W)``, on their device."""
    std, mean = torch.std_mean(images.float(), dim=(0, 2, 3))
    return mean, std.clamp_min(1e-6)


def load_data(config: DataConfig, device: torch.device) -> DataSplits:
    """Read, split and place a dataset on ``device``; every split is normalised with the
    statistics of the training part, so val and test see what training saw."""
    if config.name == "imagefolder":
        return load_imagefolder(config, device)
    if config.name in SEQUENCE_LOADERS:
        module, loader = SEQUENCE_LOADERS[config.name].split(":")
        return getattr(importlib.import_module(module), loader)(config, device)
    raw = READERS[config.name](config)
    has_test_split = raw.test_images is not None and raw.test_labels is not None
    index = split_indices(len(raw.train_labels), config, has_test_split=has_test_split)
    if index.test is None:
        test_images, test_labels = raw.test_images, raw.test_labels
    else:
        test_images, test_labels = raw.train_images[index.test], raw.train_labels[index.test]
    train_images = raw.train_images[index.train].to(device)
    stats = channel_stats(train_images)
    resize = {"image_size": config.image_size}

    def held_out(images: Tensor, labels: Tensor) -> TensorSource:
        return TensorSource(images.to(device), labels.to(device), stats, **resize, augment=False)

    train = TensorSource(
        train_images,
        raw.train_labels[index.train].to(device),
        stats,
        **resize,
        augment=config.augment,
    )
    val = held_out(raw.train_images[index.val], raw.train_labels[index.val])
    _, channels, side, _ = train_images.shape
    return DataSplits(
        train,
        val,
        held_out(test_images, test_labels),
        channels,
        config.image_size or side,
        raw.num_classes,
    )


def sample_batch(splits: DataSplits, n: int) -> Tensor:
    """The first ``n`` training inputs (fewer if the split is smaller), images normalised, for
    discovering layer shapes; augmented like any training batch when augmentation is on."""
    images, _ = next(splits.train.batches(n, epoch=0, seed=0, shuffle=False, drop_last=False))
    return images


class _SeededImages(torch.utils.data.Dataset):
    """An ImageFolder whose item key carries a seed: the transform runs under it, so
    augmentation depends on ``(seed, epoch)`` only, not on worker count or global RNG."""

    def __init__(self, folder: torch.utils.data.Dataset) -> None:
        self.folder = folder

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        index, seed = key
        with torch.random.fork_rng(devices=[]):  # CPU state only, restored on exit
            torch.default_generator.manual_seed(seed)
            return self.folder[index]


class ImageFolderSource:
    """A split streamed from disk by a DataLoader with ``num_workers`` processes, for data
    too large for the device (ImageNet layout)."""

    def __init__(
        self,
        folder: torch.utils.data.Dataset,
        indices: Tensor,
        device: torch.device,
        num_workers: int,
    ) -> None:
        self.images, self.indices = _SeededImages(folder), indices
        self.device, self.num_workers = device, num_workers
        self.num_samples = len(indices)

    def digest(self) -> str:
        """Of the files and labels the split reads (hashing the images would read them all)."""
        samples = self.images.folder.samples
        listing = "\n".join(f"{samples[i][0]}\t{samples[i][1]}" for i in self.indices.tolist())
        return hashlib.blake2b(listing.encode(), digest_size=8).hexdigest()

    def num_batches(self, batch_size: int, *, drop_last: bool) -> int:
        return count_batches(self.num_samples, batch_size, drop_last)

    def batches(
        self,
        batch_size: int,
        *,
        epoch: int,
        seed: int,
        shuffle: bool,
        drop_last: bool,
        share: Share = WHOLE,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        generator = epoch_generator(seed, epoch)
        order = self.indices
        if shuffle:
            order = order[torch.randperm(self.num_samples, generator=generator)]
        sample_seeds = torch.randint(0, 2**62, (self.num_samples,), generator=generator)
        keys = list(zip(order.tolist(), sample_seeds.tolist(), strict=True))
        # only this replica's images are decoded: its rows, or its batches
        ranges = share.ranges(self.num_samples, batch_size, drop_last)
        loader = torch.utils.data.DataLoader(
            self.images,
            batch_sampler=[keys[low:high] for low, high in ranges],
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=generator,  # worker base seeds: keeps the global RNG untouched
        )
        for images, labels in loader:
            yield (
                images.to(self.device, non_blocking=True),
                labels.to(self.device, non_blocking=True),
            )


def _imagefolder_transforms(size: int, augment: bool) -> tuple[object, object]:
    """Torchvision's reference recipe: random resized crop + flip for training, resize to
    size * 256 / 224 and centre crop for evaluation; ImageNet normalisation."""
    from torchvision import transforms as T

    evaluate = [T.Resize(int(size * 256 / 224)), T.CenterCrop(size)]
    train = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()] if augment else evaluate
    tail = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(train + tail), T.Compose(evaluate + tail)


def load_imagefolder(config: DataConfig, device: torch.device) -> DataSplits:
    """``root/train/<class>/*`` and ``root/val/<class>/*``: val is held out of train/ (and
    transformed like evaluation data), test is the val/ folder (ImageNet's published split)."""
    from torchvision.datasets import ImageFolder

    require_imagefolder(config)
    size = config.image_size or 224
    train_transform, eval_transform = _imagefolder_transforms(size, config.augment)
    folders = []
    for split, transform in (
        ("train", train_transform),
        ("train", eval_transform),
        ("val", eval_transform),
    ):
        try:
            folders.append(ImageFolder(str(config.root / split), transform=transform))
        except FileNotFoundError as error:
            raise ConfigError(f"data.root {config.root}: {error}") from None
    train, train_for_eval, test = folders
    if train.classes != test.classes:
        raise ConfigError(f"data.root {config.root}: train/ and val/ hold different class folders")
    index = split_indices(len(train), config, has_test_split=True)
    workers = config.num_workers
    return DataSplits(
        ImageFolderSource(train, index.train, device, workers),
        ImageFolderSource(train_for_eval, index.val, device, workers),
        ImageFolderSource(test, torch.arange(len(test)), device, workers),
        in_channels=3,
        image_size=size,
        num_classes=len(train.classes),
    )

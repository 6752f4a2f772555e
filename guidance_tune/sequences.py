"""Sequence tasks as data: token sequences generated from a seed, held whole on the device.

Copy-paste (the authors' encoding, guidance-method.md A.7): a string of ``L ~ U[min, max]``
digits, ``L`` drawn per example, then COPY, ``L`` blanks and EOS; the network must emit the
string again after COPY:

    input  = [d1 .. dL, COPY, 0 x L, EOS]        target = [0 x (L + 1), d1 .. dL, EOS]

Token 0 is both the digit 0 and the blank; targets equal to 0 are ignored by the loss and the
accuracy, as in the authors' code (so copied zeros are never scored). Every example is padded
to ``2 * max + 2`` with 0 after its EOS, in input and target alike.

The authors draw fresh sequences for every item; here a split is a fixed set drawn from
``data.split_seed``, so val and test do not move between evaluations, a run reads the same
samples when rerun, and the split has a digest. ``synthetic_samples`` sets its size.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from guidance_tune.config import DataConfig
from guidance_tune.data import (
    DataSplits,
    count_batches,
    epoch_generator,
    fingerprint,
    split_indices,
)
from guidance_tune.tasks import task_of

COPY, EOS = 11, 12
VOCAB_SIZE = 13  # digits 0-9, (10 unused), COPY, EOS
BLANK = 0  # also the padding, and the target index the loss ignores


def copy_paste_examples(n: int, lengths: tuple[int, int], generator: torch.Generator):
    """``n`` (input, target) pairs, int64 ``(n, 2 * max + 2)`` each, and their lengths ``L``."""
    low, high = lengths
    width = 2 * high + 2
    string_lengths = torch.randint(low, high + 1, (n,), generator=generator)
    digits = torch.randint(0, 10, (n, high), generator=generator)
    inputs = torch.full((n, width), BLANK, dtype=torch.long)
    targets = torch.full((n, width), BLANK, dtype=torch.long)
    for row, length in enumerate(string_lengths.tolist()):
        string = digits[row, :length]
        inputs[row, :length] = string
        inputs[row, length] = COPY
        inputs[row, 2 * length + 1] = EOS
        targets[row, length + 1 : 2 * length + 1] = string
        targets[row, 2 * length + 1] = EOS
    return inputs, targets, string_lengths


class TokenSource:
    """A split of token sequences on the device: inputs and per-position targets ``(n, T)``."""

    def __init__(self, inputs: Tensor, targets: Tensor) -> None:
        self.inputs, self.targets = inputs, targets
        self.num_samples = len(inputs)

    def digest(self) -> str:
        return fingerprint(self.inputs, self.targets)

    def num_batches(self, batch_size: int, *, drop_last: bool) -> int:
        return count_batches(self.num_samples, batch_size, drop_last)

    def batches(
        self, batch_size: int, *, epoch: int, seed: int, shuffle: bool, drop_last: bool
    ) -> Iterator[tuple[Tensor, Tensor]]:
        generator = epoch_generator(seed, epoch)
        n = self.num_samples
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        order = order.to(self.inputs.device)
        stop = self.num_batches(batch_size, drop_last=drop_last) * batch_size
        for start in range(0, stop, batch_size):
            index = order[start : start + batch_size]
            yield self.inputs[index], self.targets[index]


def load_copy_paste(config: DataConfig, device: torch.device) -> DataSplits:
    """``synthetic_samples`` examples from ``split_seed``, split into train, val and test as
    any dataset without a test split (``val_fraction``, ``test_fraction``, ``n_train``)."""
    generator = torch.Generator().manual_seed(config.split_seed)
    n, lengths = config.synthetic_samples, config.copy_lengths
    inputs, targets, _ = copy_paste_examples(n, lengths, generator)
    index = split_indices(len(inputs), config, has_test_split=False)

    def split(rows: Tensor) -> TokenSource:
        return TokenSource(inputs[rows].to(device), targets[rows].to(device))

    return DataSplits(
        split(index.train),
        split(index.val),
        split(index.test),
        in_channels=VOCAB_SIZE,
        image_size=inputs.shape[1],
        num_classes=VOCAB_SIZE,
        task=task_of(config.name),
    )

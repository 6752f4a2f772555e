"""Sequence tasks as data: token sequences generated from a seed, held whole on the device.

The authors draw fresh sequences for every item; here a split is a fixed set drawn from
``data.split_seed``, so val and test do not move between evaluations, a run reads the same
samples when rerun, and the split has a digest. ``synthetic_samples`` sets how many are drawn;
they are split into train, val and test like any dataset without a test split.

Copy-paste (the authors' encoding, guidance-method.md A.7): a string of ``L ~ U[min, max]``
digits, ``L`` drawn per example, then COPY, ``L`` blanks and EOS; the network must emit the
string again after COPY:

    input  = [d1 .. dL, COPY, 0 x L, EOS]        target = [0 x (L + 1), d1 .. dL, EOS]

Token 0 is both the digit 0 and the blank; targets equal to 0 are ignored by the loss and the
accuracy, as in the authors' code (so copied zeros are never scored). Every example is padded
to ``2 * max + 2`` with 0 after its EOS, in input and target alike.

Parity: a bit string of ``L ~ U[min, max]`` bits padded to ``max`` with token 2; the label is
the parity of its bits (1 when the count of ones is odd).

Each task says which positions are padding (:func:`copy_paste_positions`,
:func:`parity_positions`): guidance zeroes them in both networks before comparing, so a batch's
similarity does not depend on how far it was padded (:class:`guidance_tune.layers.LayerCapture`;
``guidance.pad_masking: false`` compares them unmasked, as the authors do).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from guidance_tune.config import DataConfig
from guidance_tune.data.splits import (
    WHOLE,
    DataSplits,
    Share,
    ValidPositions,
    count_batches,
    epoch_generator,
    fingerprint,
    split_indices,
)
from guidance_tune.data.tasks import task_of

COPY, EOS = 11, 12
VOCAB_SIZE = 13  # digits 0-9, (10 unused), COPY, EOS
BLANK = 0  # also the padding, and the target index the loss ignores
PARITY_PAD = 2
PARITY_VOCAB = 3  # bits 0 and 1, and the padding


def copy_paste_examples(n: int, lengths: tuple[int, int], generator: torch.Generator):
    """``n`` (input, target) pairs, int64 ``(n, 2 * max + 2)`` each, and their lengths ``L``;
    built for all rows at once (a study's trials each draw 100,000)."""
    low, high = lengths
    width = 2 * high + 2
    string_lengths = torch.randint(low, high + 1, (n,), generator=generator)
    digits = torch.randint(0, 10, (n, high), generator=generator)
    position = torch.arange(width)[None, :]
    length = string_lengths[:, None]
    eos = position == 2 * length + 1
    # the string at 0..L-1 in the input, again at L+1..2L in the target
    string = torch.gather(digits, 1, position.clamp(max=high - 1).expand(n, -1))
    copied = torch.gather(digits, 1, (position - length - 1).clamp(0, high - 1))
    inputs = torch.where(position < length, string, BLANK)
    inputs = torch.where(position == length, COPY, torch.where(eos, EOS, inputs))
    targets = torch.where((position > length) & (position <= 2 * length), copied, BLANK)
    targets = torch.where(eos, EOS, targets)
    return inputs, targets, string_lengths


def copy_paste_positions(tokens: Tensor) -> Tensor:
    """Up to and including the first EOS; all of a row without one (noise inputs)."""
    is_eos = tokens == EOS
    last = torch.where(is_eos.any(1), is_eos.int().argmax(1), tokens.shape[1] - 1)
    return torch.arange(tokens.shape[1], device=tokens.device) <= last[:, None]


def parity_examples(n: int, lengths: tuple[int, int], generator: torch.Generator):
    """``n`` bit strings, int64 ``(n, max)`` padded with :data:`PARITY_PAD`, their parities
    ``(n,)`` and lengths ``(n,)``."""
    low, high = lengths
    string_lengths = torch.randint(low, high + 1, (n,), generator=generator)
    bits = torch.randint(0, 2, (n, high), generator=generator)
    valid = torch.arange(high) < string_lengths[:, None]
    inputs = torch.where(valid, bits, PARITY_PAD)
    labels = (bits * valid).sum(1) % 2
    return inputs, labels, string_lengths


def parity_positions(tokens: Tensor) -> Tensor:
    return tokens != PARITY_PAD


class TokenSource:
    """A split of token sequences on the device: inputs ``(n, T)`` and targets, ``(n, T)`` (a
    token per position) or ``(n,)`` (a label per sequence)."""

    def __init__(self, inputs: Tensor, targets: Tensor) -> None:
        self.inputs, self.targets = inputs, targets
        self.num_samples = len(inputs)

    def digest(self) -> str:
        return fingerprint(self.inputs, self.targets)

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
        n = self.num_samples
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        order = order.to(self.inputs.device)
        for low, high in share.ranges(n, batch_size, drop_last):
            index = order[low:high]
            yield self.inputs[index], self.targets[index]


@dataclass(frozen=True)
class GeneratedTask:
    """How a generated sequence dataset is drawn and read: its examples from
    ``(n, lengths, generator)``, input vocabulary, classes (output vocabulary), padding."""

    examples: Callable[..., tuple[Tensor, Tensor, Tensor]]
    vocab_size: int
    num_classes: int
    valid_positions: ValidPositions


GENERATED = {
    "copy_paste": GeneratedTask(copy_paste_examples, VOCAB_SIZE, VOCAB_SIZE, copy_paste_positions),
    "parity": GeneratedTask(parity_examples, PARITY_VOCAB, 2, parity_positions),
}


def load_generated(config: DataConfig, device: torch.device) -> DataSplits:
    """``synthetic_samples`` examples from ``split_seed``, split into train, val and test as
    any dataset without a test split (``val_fraction``, ``test_fraction``, ``n_train``)."""
    task = GENERATED[config.name]
    generator = torch.Generator().manual_seed(config.split_seed)
    inputs, targets, _ = task.examples(config.synthetic_samples, config.sequence_lengths, generator)
    index = split_indices(len(inputs), config, has_test_split=False)

    def split(rows: Tensor) -> TokenSource:
        return TokenSource(inputs[rows].to(device), targets[rows].to(device))

    return DataSplits(
        split(index.train),
        split(index.val),
        split(index.test),
        in_channels=task.vocab_size,
        image_size=inputs.shape[1],
        num_classes=task.num_classes,
        task=task_of(config.name),
        inputs="tokens",
        valid_positions=task.valid_positions,
    )

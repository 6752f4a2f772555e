"""Word-level language modelling data: a corpus in the WikiText layout, as token sequences.

``data.root`` holds ``wiki.train.tokens``, ``wiki.valid.tokens`` and ``wiki.test.tokens``
(WikiText-2 and -103 as published: words separated by spaces, ``<unk>`` already in place of
rare words). Each non-empty line is its words and then ``<eos>``. The vocabulary is built from
train alone (the ``max_vocab`` most frequent words where set, ``<unk>`` first), and every
other word, in any split, reads as ``<unk>``. A split is cut into non-overlapping sequences of
``context_length`` words whose targets are the same words shifted by one (the authors' chunks);
the few words after the last whole sequence are dropped. train, valid and test are the three
splits (``val_fraction`` is not used: the corpus has its own val); ``n_train`` keeps a seeded
subset of the training sequences.

``grammar_lm`` is the same task on a corpus generated from a seeded grammar
(:mod:`guidance_tune.data.corpus`), so tests and the CPU studies need no files.
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from guidance_tune.config import ConfigError, DataConfig
from guidance_tune.data.files import text_lm_paths
from guidance_tune.data.sequences import TokenSource
from guidance_tune.data.splits import DataSplits
from guidance_tune.data.tasks import task_of

UNK, EOS_WORD = "<unk>", "<eos>"


def words_of(lines: Iterable[str]) -> Iterator[str]:
    """Each non-empty line's words, then ``<eos>``."""
    for line in lines:
        words = line.split()
        if words:
            yield from words
            yield EOS_WORD


def build_vocabulary(words: Iterable[str], max_size: int | None = None) -> list[str]:
    """``<unk>`` then the words by falling count (ties alphabetical, so it is reproducible),
    ``max_size`` in all where given."""
    counts = Counter(words)
    counts.pop(UNK, None)
    ranked = sorted(counts, key=lambda word: (-counts[word], word))
    return [UNK, *(ranked if max_size is None else ranked[: max_size - 1])]


def encode(words: Iterable[str], vocabulary: list[str]) -> Tensor:
    """int64 ids ``(n,)``; a word outside the vocabulary is ``<unk>`` (id 0). An array, not a
    list, holds the ids on the way: WikiText-103's 103 M words fit in 0.8 GB that way."""
    index = {word: i for i, word in enumerate(vocabulary)}
    ids = array("q", (index.get(word, 0) for word in words))
    return torch.frombuffer(ids, dtype=torch.int64).clone() if ids else torch.zeros(0).long()


def sequences(ids: Tensor, context_length: int) -> tuple[Tensor, Tensor]:
    """Non-overlapping inputs ``(n, context_length)`` and their next-word targets."""
    n = (len(ids) - 1) // context_length
    if n < 1:
        raise ConfigError(
            f"data.context_length {context_length}: a split has only {len(ids)} words, fewer "
            "than one sequence and its next word; lower data.context_length or use more text"
        )
    stop = n * context_length
    return ids[:stop].view(n, context_length), ids[1 : stop + 1].view(n, context_length)


def _lines(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as stream:
        yield from stream


def _splits(
    config: DataConfig, device: torch.device, vocabulary: list[str], ids: dict[str, Tensor]
) -> DataSplits:
    sources = {}
    for split, split_ids in ids.items():
        inputs, targets = sequences(split_ids, config.context_length)
        if split == "train" and config.n_train is not None:
            if config.n_train > len(inputs):
                raise ConfigError(
                    f"data.n_train {config.n_train} is larger than the {len(inputs)} training "
                    f"sequences of {config.name}: lower data.n_train"
                )
            generator = torch.Generator().manual_seed(config.split_seed)
            keep = torch.randperm(len(inputs), generator=generator)[: config.n_train].sort()
            inputs, targets = inputs[keep.values], targets[keep.values]
        sources[split] = TokenSource(inputs.to(device), targets.to(device))
    return DataSplits(
        sources["train"],
        sources["val"],
        sources["test"],
        in_channels=len(vocabulary),
        image_size=config.context_length,
        num_classes=len(vocabulary),
        task=task_of(config.name),
        inputs="tokens",
    )


def load_text_lm(config: DataConfig, device: torch.device) -> DataSplits:
    """Two passes over train (count, then encode) and one over val and test, so no split is
    held as words."""
    paths = text_lm_paths(config)
    vocabulary = build_vocabulary(words_of(_lines(paths["train"])), config.max_vocab)
    ids = {split: encode(words_of(_lines(path)), vocabulary) for split, path in paths.items()}
    return _splits(config, device, vocabulary, ids)


def grammar_words(config: DataConfig) -> dict[str, int]:
    """How many words ``grammar_lm`` generates per split: ``synthetic_samples`` training
    sequences' worth (the ``<eos>`` words come on top), and val and test of ``val_fraction``
    and ``test_fraction`` of that."""
    train = config.synthetic_samples * config.context_length + 1
    held_out = {"val": config.val_fraction, "test": config.test_fraction}
    minimum = config.context_length + 1
    return {"train": train} | {
        split: max(minimum, round(train * share)) for split, share in held_out.items()
    }


def load_grammar_lm(config: DataConfig, device: torch.device) -> DataSplits:
    from guidance_tune.data.corpus import generate_corpus

    corpus = generate_corpus(config.split_seed, grammar_words(config))
    vocabulary = build_vocabulary(words_of(corpus["train"]), config.max_vocab)
    ids = {split: encode(words_of(lines), vocabulary) for split, lines in corpus.items()}
    return _splits(config, device, vocabulary, ids)

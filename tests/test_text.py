"""Language modelling data: WikiText files, the train-only vocabulary, next-word sequences,
perplexity, the generated grammar corpus, and gradient clipping, on the CPU."""

import math
import random

import pytest
import torch

from guidance_tune.config import ConfigError, DataConfig, parse_run_config
from guidance_tune.data.corpus import generate_corpus, make_lexicon, write_corpus
from guidance_tune.data.splits import load_data
from guidance_tune.data.tasks import TASKS
from guidance_tune.data.text import (
    EOS_WORD,
    UNK,
    build_vocabulary,
    encode,
    grammar_words,
    sequences,
    words_of,
)
from guidance_tune.training.loop import Reporter, build_run, train_one_epoch

CPU = torch.device("cpu")


def write_wikitext(root, train, valid, test):
    root.mkdir(parents=True, exist_ok=True)
    for name, text in (("train", train), ("valid", valid), ("test", test)):
        (root / f"wiki.{name}.tokens").write_text(text)
    return root


def test_the_vocabulary_comes_from_train_and_other_words_read_as_unk(tmp_path):
    root = write_wikitext(
        tmp_path / "wiki",
        train=" = Title = \n\n the cat sat on the mat \n the dog sat \n",
        valid=" the cow sat \n",
        test=" a <unk> dog \n",
    )
    config = DataConfig(name="text_lm", root=root, context_length=2)
    splits = load_data(config, CPU)
    vocabulary = build_vocabulary(words_of(open(root / "wiki.train.tokens")))
    # <unk> first, then by count, ties alphabetical: <eos> and "the" (3), "=" and "sat" (2)
    assert vocabulary[:5] == [UNK, EOS_WORD, "the", "=", "sat"]
    assert splits.in_channels == splits.num_classes == len(vocabulary) == 10
    val_words = [vocabulary[i] for i in splits.val.inputs.flatten().tolist()]
    assert val_words == ["the", UNK]  # "cow" is not a training word; "sat" is its target
    assert [vocabulary[i] for i in splits.val.targets.flatten().tolist()] == [UNK, "sat"]
    test_words = [vocabulary[i] for i in splits.test.inputs.flatten().tolist()]
    assert test_words == [UNK, UNK]  # "a" unseen in train, "<unk>" itself


def test_max_vocab_keeps_the_most_frequent_training_words():
    words = "b a a c c c d".split()
    assert build_vocabulary(words, max_size=3) == [UNK, "c", "a"]
    ids = encode(words, build_vocabulary(words, max_size=3))
    assert ids.tolist() == [0, 2, 2, 1, 1, 1, 0]


def test_sequences_are_cut_without_overlap_and_targets_are_the_next_words():
    inputs, targets = sequences(torch.arange(11), context_length=3)
    assert inputs.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert targets.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    with pytest.raises(ConfigError, match="data.context_length 20"):
        sequences(torch.arange(11), context_length=20)


def test_perplexity_is_the_exponential_of_the_mean_word_nll():
    lm = TASKS["language_model"]
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
    targets = torch.tensor([[0, 2]])  # p = 0.5, then p = 0.1
    metrics = lm.scores(lm.score_sums(logits, targets, 3), "val", 3)
    mean_nll = (math.log(2) + math.log(10)) / 2
    assert metrics["val/loss"] == pytest.approx(mean_nll)
    assert metrics["val/ppl"] == pytest.approx(math.sqrt(20))  # exp of it: (2 * 10) ** (1/2)
    assert lm.loss(logits, targets).item() == pytest.approx(mean_nll)
    # summed over batches, a split's perplexity weighs every word once
    second = lm.score_sums(torch.log(torch.tensor([[[0.25, 0.5, 0.25]]])), torch.tensor([[1]]), 3)
    split = lm.scores(lm.score_sums(logits, targets, 3) + second, "val", 3)
    assert split["val/ppl"] == pytest.approx(math.exp((mean_nll * 2 + math.log(2)) / 3))


def test_text_lm_without_its_files_names_data_root_and_the_files(tmp_path):
    with pytest.raises(ConfigError, match=r"data.root .*wiki.valid.tokens"):
        (tmp_path / "wiki.train.tokens").write_text("a b\n")
        load_data(DataConfig(name="text_lm", root=tmp_path), CPU)
    with pytest.raises(ConfigError, match="data.root must be set for text_lm"):
        load_data(DataConfig(name="text_lm"), CPU)


def test_the_grammar_corpus_is_a_seed_and_reads_the_same_from_files(tmp_path):
    words = {"train": 3000, "val": 400, "test": 400}
    first, again, other = (generate_corpus(seed, words) for seed in (0, 0, 1))
    assert first == again and first["train"] != other["train"]
    assert first["val"] != first["test"]  # each split its own sample of the language
    config = DataConfig(name="grammar_lm", synthetic_samples=50, context_length=20)
    generated = load_data(config, CPU)
    assert generated.train.num_samples >= 50 and generated.task.name == "language_model"
    write_corpus(tmp_path / "corpus", 0, grammar_words(config))
    files = load_data(DataConfig(name="text_lm", root=tmp_path / "corpus", context_length=20), CPU)
    for split in ("train", "val", "test"):
        assert getattr(files, split).digest() == getattr(generated, split).digest()


def test_the_main_verb_agrees_with_its_subject_across_a_relative_clause():
    """The long-range dependency the corpus is for: in "DET NOUN that VERB VERB ...", with an
    intransitive verb in the clause, the second verb is the main one and takes -s exactly when
    the subject noun is singular, two words past the clause."""
    lexicon = make_lexicon(random.Random("lexicon-0"))
    intransitive = {
        v for v, objects in zip(lexicon.verbs, lexicon.objects, strict=True) if not objects
    }
    verbs, nouns = set(lexicon.verbs), set(lexicon.nouns)
    lines = generate_corpus(0, {"train": 50000})["train"]
    checked = 0
    for sentence in " ".join(lines).split(" . "):
        words = sentence.split()
        if len(words) < 5 or words[2] != "that":
            continue
        noun, clause_verb, main_verb = words[1], words[3], words[4]
        if clause_verb.removesuffix("s") in intransitive and main_verb.removesuffix("s") in verbs:
            singular = noun in nouns
            assert singular or noun.removesuffix("s") in nouns
            assert main_verb.endswith("s") == singular == clause_verb.endswith("s")
            checked += 1
    assert checked > 50


def first_step_length(clip: float | None) -> float:
    """How far one SGD step at lr 1 without momentum moves the weights: the gradient's norm."""
    config = parse_run_config(
        {
            "target": {"name": "rnn_lm", "kwargs": {"embed_dim": 8, "hidden_size": 8}},
            "guidance": {"kind": "none"},
            "data": {"name": "grammar_lm", "synthetic_samples": 32, "context_length": 8},
            "optim": {"optimizer": "sgd", "lr": 1.0, "momentum": 0.0, "grad_clip_norm": clip},
            "train": {"batch_size": 16, "max_steps_per_epoch": 1},
        }
    )
    run = build_run(config)
    before = torch.cat([p.detach().flatten().clone() for p in run.target.parameters()])
    train_one_epoch(run, 0, Reporter())
    after = torch.cat([p.detach().flatten() for p in run.target.parameters()])
    return (after - before).norm().item()


def test_gradient_clipping_bounds_each_step_to_the_clip_norm():
    assert first_step_length(None) > 0.1
    assert first_step_length(1e-3) == pytest.approx(1e-3, rel=1e-3)

"""A text corpus generated from a seeded grammar, so the language-model task runs offline.

The language is small but not trivial for a recurrent network: sentences of a probabilistic
context-free grammar over an invented lexicon, with two long-range dependencies,

- number agreement of a verb with its subject across relative clauses ("the dax that the wugs
  near a lorb fep blicks", where ``blicks`` agrees with ``dax``, eight words back), and
- selectional preference: each transitive verb takes objects from its own subset of nouns,

and Zipf-distributed word choice, as in natural text. Lines hold a few sentences; text is
lower-case words separated by spaces, in the WikiText layout (:func:`write_corpus` writes
``wiki.{train,valid,test}.tokens``). The lexicon and every split are drawn from one seed, so a
seed is a language and its three samples.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"
SINGULAR_DETERMINERS = ("a", "the", "this", "every")
PLURAL_DETERMINERS = ("the", "some", "these", "all")
PREPOSITIONS = ("near", "with", "under")
SENTENCES_PER_LINE = (2, 6)
MAX_DEPTH = 2  # relative clauses within relative clauses, at most


@dataclass(frozen=True)
class Lexicon:
    """Stems; a noun's plural and a verb's singular add ``s``. ``objects[v]``: the nouns
    transitive verb ``v`` takes as objects (intransitive verbs take none)."""

    nouns: tuple[str, ...]
    verbs: tuple[str, ...]
    adjectives: tuple[str, ...]
    objects: tuple[tuple[int, ...], ...]


def _stems(count: int, rng: random.Random, taken: set[str]) -> tuple[str, ...]:
    """``count`` new pronounceable stems (consonant-vowel syllables, a closing consonant)."""
    stems = []
    while len(stems) < count:
        syllables = rng.choice((1, 2, 2, 3))
        stem = "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(syllables))
        stem += rng.choice(CONSONANTS)
        if stem not in taken and not stem.endswith("s"):
            taken.add(stem)
            stems.append(stem)
    return tuple(stems)


def make_lexicon(rng: random.Random, nouns: int = 120, verbs: int = 60, adjectives: int = 30):
    taken = set(SINGULAR_DETERMINERS + PLURAL_DETERMINERS + PREPOSITIONS + ("that",))
    noun_stems, verb_stems = _stems(nouns, rng, taken), _stems(verbs, rng, taken)
    objects = tuple(
        () if v % 3 == 0 else tuple(rng.sample(range(nouns), rng.randint(3, 12)))
        for v in range(verbs)
    )
    return Lexicon(noun_stems, verb_stems, _stems(adjectives, rng, taken), objects)


class Grammar:
    """Draws sentences of the lexicon's language."""

    def __init__(self, lexicon: Lexicon, rng: random.Random) -> None:
        self.lexicon, self.rng = lexicon, rng
        self._noun_weights = _zipf(len(lexicon.nouns))
        self._verb_weights = _zipf(len(lexicon.verbs))

    def _pick(self, count: int, weights: list[float]) -> int:
        return self.rng.choices(range(count), weights)[0]

    def noun_phrase(self, plural: bool, depth: int, noun: int | None = None) -> list[str]:
        lexicon, rng = self.lexicon, self.rng
        if noun is None:
            noun = self._pick(len(lexicon.nouns), self._noun_weights)
        words = [rng.choice(PLURAL_DETERMINERS if plural else SINGULAR_DETERMINERS)]
        if rng.random() < 0.3:
            words.append(rng.choice(lexicon.adjectives))
        words.append(lexicon.nouns[noun] + "s" * plural)
        if depth < MAX_DEPTH and rng.random() < 0.35:
            words += ["that", *self._relative_clause(plural, depth + 1)]
        elif depth < MAX_DEPTH and rng.random() < 0.15:
            words += [rng.choice(PREPOSITIONS), *self.noun_phrase(rng.random() < 0.5, depth + 1)]
        return words

    def _relative_clause(self, plural: bool, depth: int) -> list[str]:
        """Subject relatives agree with the head noun; object relatives with their own
        subject, and their verb is transitive."""
        if self.rng.random() < 0.5:
            return self.verb_phrase(plural, depth)
        subject_plural = self.rng.random() < 0.5
        verb = self._transitive_verb()
        return [*self.noun_phrase(subject_plural, depth), self._verb_form(verb, subject_plural)]

    def _transitive_verb(self) -> int:
        while True:
            verb = self._pick(len(self.lexicon.verbs), self._verb_weights)
            if self.lexicon.objects[verb]:
                return verb

    def _verb_form(self, verb: int, plural: bool) -> str:
        return self.lexicon.verbs[verb] + "s" * (not plural)

    def verb_phrase(self, plural: bool, depth: int) -> list[str]:
        verb = self._pick(len(self.lexicon.verbs), self._verb_weights)
        words = [self._verb_form(verb, plural)]
        if self.lexicon.objects[verb]:
            noun = self.rng.choice(self.lexicon.objects[verb])
            words += self.noun_phrase(self.rng.random() < 0.5, depth + 1, noun)
        return words

    def sentence(self) -> list[str]:
        plural = self.rng.random() < 0.5
        return [*self.noun_phrase(plural, 0), *self.verb_phrase(plural, 0), "."]

    def lines(self, words: int) -> list[str]:
        """Lines of a few sentences each, at least ``words`` words in all."""
        lines, count = [], 0
        while count < words:
            line = []
            for _ in range(self.rng.randint(*SENTENCES_PER_LINE)):
                line += self.sentence()
            lines.append(" ".join(line))
            count += len(line)
        return lines


def _zipf(count: int) -> list[float]:
    return [1.0 / (rank + 1) for rank in range(count)]


def generate_corpus(seed: int, words: dict[str, int]) -> dict[str, list[str]]:
    """Lines per split (``train``, ``val``, ``test``), at least ``words[split]`` words each,
    all in the language that ``seed`` draws; each split from its own stream."""
    lexicon = make_lexicon(random.Random(f"lexicon-{seed}"))
    return {
        split: Grammar(lexicon, random.Random(f"{split}-{seed}")).lines(count)
        for split, count in words.items()
    }


def write_corpus(directory: Path, seed: int, words: dict[str, int]) -> None:
    """The corpus as WikiText files (``wiki.train.tokens`` ...), for ``data.name: text_lm``."""
    from guidance_tune.data.files import TEXT_LM_FILES

    directory.mkdir(parents=True, exist_ok=True)
    for split, lines in generate_corpus(seed, words).items():
        (directory / TEXT_LM_FILES[split]).write_text("".join(f" {line} \n" for line in lines))

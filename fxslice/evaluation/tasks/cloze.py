"""`wikitext_cloze`: a multiple-choice task built from the WikiText-2 test text this package carries, so that the
zero-shot path can be run and checked offline. Each document is a sentence cut after a share of its words;
the choices are its true ending and the endings of three other sentences of similar length, in a shuffled
order (the answer key is the true ending's position). A model that reads the text scores far above chance
(25%); nothing here is a published benchmark."""

from __future__ import annotations

import random
import re
from typing import Any

__all__ = ["documents", "dataset"]


def _sentences(text: str) -> list[list[str]]:
    found = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for sentence in re.split(r"(?<=[.!?]) (?=[A-Z])", line):
            words = sentence.split()
            if 12 <= len(words) <= 40 and "@" not in sentence and sentence.endswith("."):
                found.append(words)
    return found


def documents(count: int = 500, *, seed: int = 0, source: str = "wikitext2:test") -> list[dict[str, Any]]:
    """`count` documents {context, choices, label}; the same for the same seed and source."""
    from fxslice.data import load_text

    rng = random.Random(seed)
    sentences = _sentences(load_text(source))
    picked = rng.sample(range(len(sentences)), min(count, len(sentences)))
    docs = []
    for index in picked:
        words = sentences[index]
        cut = len(words) * 3 // 5
        ending = " ".join(words[cut:])
        others = []
        while len(others) < 3:
            other = sentences[rng.randrange(len(sentences))]
            candidate = " ".join(other[len(other) * 3 // 5:])
            if other is not words and candidate != ending and candidate not in others:
                others.append(candidate)
        choices = [ending, *others]
        rng.shuffle(choices)
        docs.append({"context": " ".join(words[:cut]), "choices": choices, "label": choices.index(ending)})
    return docs


def dataset(count: int = 500, seed: int = 0, **_: Any) -> Any:
    """The documents as a `datasets.DatasetDict` with a `test` split: what lm-eval's `custom_dataset` returns."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(documents(count, seed=seed))})

"""Built-in "facts" data set: the in-context probe. Groups of short text documents that each state
one made-up fact, "zobeki is purple.", about a name no other group uses.

A group binds a fresh name (three consonant-vowel syllables, "zobeki") to a colour, both drawn at
random, and states the binding in 2 or 3 documents, each with another phrasing ("the colour of
zobeki is purple.", "look at zobeki: it is purple."). Every phrasing names the name before the
colour and ends with the colour, so a document's colour is predictable from an earlier document of
its group and from nothing else: the name says nothing about the colour (drawn independently), the
phrasing neither, and no other group uses the name. A model that sees the earlier document of the
group in its context (attention across the documents of a row, ``data.attention=causal``, with the
group's documents in one row, ``data.order=icp``) can copy the colour; without it the best guess
is one of :data:`COLOURS` (chance ``1 / len(COLOURS)``). The experiment
``examples/experiments/icp`` scores exactly that.

- ``facts_documents(n, seed)``: ``n`` documents, the groups' documents in a seeded shuffle (the
  input order does not already put a group together: that is the ordering's job); every document's
  ``group`` is ``"facts:<name>"``, so the held-out split keeps a group whole
  (:func:`megafusion.data.loader.held_documents`): a held-out document's colour was never trained
  on, so only its context can give it;
- ``fact_groups(n, seed)``: the same documents' ``(text, name, colour)``, in the same order, for
  an evaluation that needs to know which documents belong together;
- ``fact_span(encode, text)``: where the colour stands in a document's text ids.

Group ``g`` depends only on ``(seed, g)`` and the names drawn before it (a name already used is
drawn again).
"""

from __future__ import annotations

import numpy as np

from megafusion.core.errors import DataError
from megafusion.data.types import Document, TextSegment

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
SYLLABLES_PER_NAME = 3  # 14 x 5 = 70 syllables: 343,000 names
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "pink", "brown", "grey", "white")
# The name before the colour, the colour last (only "." after it): the colour is the fact.
TEMPLATES = (
    "{name} is {colour}.",
    "the colour of {name} is {colour}.",
    "everyone says that {name} is {colour}.",
    "look at {name}: it is {colour}.",
    "{name} was painted {colour}.",
    "i once saw {name} and it was {colour}.",
)
GROUP_SIZES = (2, 3)  # documents per group, drawn uniformly
_ORDER_SALT = 0xFAC75  # the input order's shuffle: a stream of its own


def _group(seed: int, g: int, seen: set) -> tuple[str, str, list[int]]:
    """(name, colour, template indices) of group ``g``: drawn in this fixed order."""
    for attempt in range(1000):
        rng = np.random.default_rng([seed, g, attempt])
        name = "".join(
            CONSONANTS[rng.integers(len(CONSONANTS))] + VOWELS[rng.integers(len(VOWELS))]
            for _ in range(SYLLABLES_PER_NAME)
        )
        if name not in seen:
            break
    else:  # never with 343,000 names and groups of two or more documents per name
        raise DataError(f"builtin:facts: no new name for group {g}: lower data.num_samples")
    seen.add(name)
    colour = COLOURS[rng.integers(len(COLOURS))]
    size = GROUP_SIZES[rng.integers(len(GROUP_SIZES))]
    return name, colour, rng.permutation(len(TEMPLATES))[:size].tolist()


def fact_groups(num_samples: int, seed: int) -> list[tuple[str, str, str]]:
    """``(text, name, colour)`` of each of the ``num_samples`` documents, in the set's order."""
    if seed < 0:
        raise DataError(f"builtin:facts: seed must be >= 0, got {seed}")
    seen: set[str] = set()
    docs: list[tuple[str, str, str]] = []
    g = 0
    while len(docs) < num_samples:
        name, colour, templates = _group(seed, g, seen)
        docs += [(TEMPLATES[t].format(name=name, colour=colour), name, colour) for t in templates]
        g += 1
    docs = docs[:num_samples]  # the last group may lose a document
    order = np.random.default_rng([seed, _ORDER_SALT]).permutation(len(docs))
    return [docs[i] for i in order]


def facts_documents(num_samples: int, seed: int) -> list[Document]:
    """``num_samples`` documents (``data.num_samples`` of a run), each grouped by its name."""
    return [
        Document([TextSegment(text)], source=f"builtin:facts:{i}", group=f"facts:{name}")
        for i, (text, name, _) in enumerate(fact_groups(num_samples, seed))
    ]


def fact_span(encode, text: str) -> tuple[int, int]:
    """``(start, end)``: where the colour stands in ``encode(text)`` (a text tokenizer's ids of a
    facts document's text): the pieces of the colour word, or of the whole last word ("purple.")
    where the tokenizer has merged the final "." into it. The tokenizer must split at spaces
    (SentencePiece does), so that the text's ids begin with those of the text before the colour."""
    head, word = text.rsplit(" ", 1)
    ids, before, colour = list(encode(text)), list(encode(head)), list(encode(f"{head} {word.rstrip('.')}"))
    if ids[: len(before)] != before or len(ids) <= len(before):
        raise DataError(f"builtin:facts: the tokenizer does not split {text!r} at its last space")
    end = len(colour) if ids[: len(colour)] == colour and len(colour) > len(before) else len(ids)
    return len(before), end


__all__ = ["COLOURS", "TEMPLATES", "fact_groups", "facts_documents", "fact_span"]

"""Built-in "arithmetic" data set: short text-only documents stating a sum, a difference or a product
in number words ("three plus four makes seven.").

A text domain beside the captioned images of shapes and digits (Branch-Train-MiX trains one branch
per domain, docs/data.md "Domains"). Document ``i`` depends only on ``(seed, i)`` and the documents
before it (a drawn statement already in the set is drawn again, so the set holds no duplicate that
could sit in both the training and the held-out split), so any prefix of a larger set is the
smaller set. Sums and differences take operands 0..99, products 0..12; every result is below 200.
"""

from __future__ import annotations

import numpy as np

from megafusion.core.errors import DataError
from megafusion.data.types import Document, TextSegment

ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
# (operator, its words, how the operands are drawn): a - b with a >= b, so results stay natural numbers.
OPERATIONS = (("+", "plus", 100), ("-", "minus", 100), ("*", "times", 13))
TEMPLATES = (
    "{a} {op} {b} makes {c}.",
    "{a} {op} {b} is {c}.",
    "{a} {op} {b} equals {c}.",
    "what is {a} {op} {b}? it is {c}.",
)


def number_words(n: int) -> str:
    """English words of ``0 <= n < 1000`` ("one hundred and forty-two")."""
    if not 0 <= n < 1000:
        raise DataError(f"builtin:arithmetic: number_words takes 0..999, got {n}")
    if n < 20:
        return ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return TENS[tens] + (f"-{ONES[ones]}" if ones else "")
    hundreds, rest = divmod(n, 100)
    return f"{ONES[hundreds]} hundred" + (f" and {number_words(rest)}" if rest else "")


def _statement(rng: np.random.Generator) -> tuple[int, str, int, int]:
    """(a, operator, b, template index) drawn in this fixed order."""
    op, _, span = OPERATIONS[rng.integers(len(OPERATIONS))]
    a, b = int(rng.integers(span)), int(rng.integers(span))
    if op == "-" and a < b:
        a, b = b, a
    return a, op, b, int(rng.integers(len(TEMPLATES)))


def arithmetic_text(a: int, op: str, b: int, template: int) -> str:
    words = {o: w for o, w, _ in OPERATIONS}
    c = {"+": a + b, "-": a - b, "*": a * b}[op]
    return TEMPLATES[template].format(a=number_words(a), op=words[op], b=number_words(b), c=number_words(c))


def arithmetic_documents(num_samples: int, seed: int) -> list[Document]:
    """``num_samples`` distinct text documents (``data.num_samples`` of a run; at most the
    ~61,000 distinct statements the operands and templates allow)."""
    if seed < 0:
        raise DataError(f"builtin:arithmetic: seed must be >= 0, got {seed}")
    seen, documents = set(), []
    for i in range(num_samples):
        for attempt in range(1000):
            text = arithmetic_text(*_statement(np.random.default_rng([seed, i, attempt])))
            if text not in seen:
                break
        else:
            raise DataError(
                f"builtin:arithmetic: no new statement for document {i}: the set has run out of distinct "
                f"statements; lower data.num_samples"
            )
        seen.add(text)
        documents.append(Document([TextSegment(text)], source=f"builtin:arithmetic:{i}"))
    return documents

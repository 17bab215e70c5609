"""The text side of the joint tokenizer: one small interface, two backends.

``load_text_tokenizer(path)`` picks the backend from what ``path`` names:

- a SentencePiece ``.model`` (``megafusion tokenizer train``, or the built-in one):
  :class:`SentencePieceText`;
- a Hugging Face ``tokenizer.json``, or a directory holding one (what ``save_pretrained``
  writes, e.g. a Llama-3 checkpoint directory): :class:`~megafusion.data.tokenizers.hf.HuggingFaceText`.

Either way the result is a :class:`TextTokenizer`: ids ``[0, vocab_size)`` exactly as the
backend gives them, the ``bos`` / ``eos`` / ``pad`` ids, ``encode`` / ``decode`` of plain text
(no special tokens added: the joint tokenizer adds ``bos`` / ``eos`` itself) and ``identity()``,
the keys (a content hash and whatever else changes the ids) that tell datasets and checkpoints
made with another tokenizer apart. ``MultimodalTokenizer`` only uses this interface.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from megafusion.core.errors import DataError

# How the joint tokenizer's errors tell the user to make a SentencePiece model.
TRAIN_HINT = "`megafusion tokenizer train --input SHARDS --vocab-size N --output PREFIX`"


class TextTokenizer(Protocol):
    """What the joint tokenizer needs of a text tokenizer (ids are used unchanged)."""

    path: str  # the file it was loaded from (for messages)
    vocab_size: int  # every id it produces or reserves is in [0, vocab_size)
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]:
        """The ids of ``text``, without bos / eos or any other added special token."""

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` (all ``< vocab_size``)."""

    def identity(self) -> dict:
        """JSON-able keys that differ between tokenizers giving different ids (a content hash)."""


class SentencePieceText:
    """A SentencePiece model with pad / bos / eos pieces (``train_sentencepiece`` sets 0 / 2 / 3)."""

    def __init__(self, data: bytes, path: str):
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.load_from_serialized_proto(data)
        except (RuntimeError, OSError, TypeError) as exc:
            raise DataError(
                f"{path}: not a valid SentencePiece model ({exc}); the file is corrupt or of another "
                f"kind (a Hugging Face tokenizer must be a tokenizer.json): retrain it with "
                f"{TRAIN_HINT}"
            ) from None
        if sp.get_piece_size() == 0:
            raise DataError(f"{path}: SentencePiece model with no pieces; retrain it with {TRAIN_HINT}")
        for name, piece_id in (("pad", sp.pad_id()), ("bos", sp.bos_id()), ("eos", sp.eos_id())):
            if piece_id < 0:
                raise DataError(
                    f"{path}: has no {name} piece; train it with `megafusion tokenizer train` "
                    "(which sets pad=0 unk=1 bos=2 eos=3)"
                )
        self._sp, self.path = sp, path
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.vocab_size = sp.get_piece_size()
        self.pad_id, self.bos_id, self.eos_id = sp.pad_id(), sp.bos_id(), sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def identity(self) -> dict:
        # The key name predates the Hugging Face backend: datasets and checkpoints store it.
        return {"sentencepiece_sha256": self.sha256}


def _is_json(path: Path) -> bool:
    """Whether a file holds JSON (a tokenizer.json under another name); a SentencePiece model is a
    protobuf, whose first byte is never ``{``."""
    try:
        with open(path, "rb") as f:
            return f.read(64).lstrip().startswith(b"{")
    except OSError:
        return False  # the backend's own read reports it


def load_text_tokenizer(path: str | Path) -> TextTokenizer:
    """The text tokenizer ``path`` names: a directory or JSON file is Hugging Face, else SentencePiece."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".json" or _is_json(path):
        from megafusion.data.tokenizers.hf import HuggingFaceText

        return HuggingFaceText.from_path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(
            f"{path}: cannot read the tokenizer ({exc.strerror or exc}); check the path: give a "
            f"SentencePiece .model (train one with {TRAIN_HINT}) or a Hugging Face tokenizer.json "
            "(or the directory holding it)"
        ) from None
    return SentencePieceText(data, str(path))

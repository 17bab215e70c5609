"""The joint text + image tokenizer, and training of its SentencePiece text part.

Joint vocabulary (``n_text`` = the text tokenizer's ids, ``V`` = codec vocabulary)::

    [0, n_text)                      text ids, exactly as the text tokenizer gives them
    n_text                           <boi>  begin of image (a TEXT token: the text side predicts it)
    n_text + 1                       <eoi>  end of image   (TEXT as well)
    [n_text + 2, n_text + 2 + V)     image code c -> image_offset + c

The text tokenizer (``megafusion.data.tokenizers.text``) is a SentencePiece model (pad = 0,
unk = 1, bos = 2, eos = 3 when trained here) or a Hugging Face ``tokenizer.json`` (its whole
vocabulary, its own bos / eos, pad = eos: ``megafusion.data.tokenizers.hf``); megafusion's
tokens come after it, so a Hugging Face model's text ids stay what they were.

A document becomes ``[bos] + per segment (text ids | [boi] codes [eoi]) + [eos]``; every
token is TEXT except the image codes.

SentencePiece training (``train_sentencepiece``) is BPE, single-threaded, unshuffled, over
all sentences, written through ``model_writer`` so that the model bytes depend only on the
texts and parameters (not on paths or thread timing). ``hard_vocab_limit=False``: a corpus too
small for ``vocab_size`` gives a smaller vocabulary instead of an error.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Iterator

import numpy as np
import sentencepiece as spm

from megafusion.core.errors import DataError
from megafusion.core.io import atomic_write
from megafusion.core.modality import Modality
from megafusion.data.tokenizers.text import TextTokenizer, load_text_tokenizer
from megafusion.data.types import Document, ImageCodec, ImageSegment, Segment, TextSegment, TokenizedDocument

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# Bump when the training settings below change: cached built-in tokenizers are keyed on it.
TRAINING_VERSION = 1
# Sentences longer than this many bytes would be dropped by SentencePiece with only a log line;
# far above any real line, so nothing is dropped, and fixed so the model bytes do not vary.
MAX_SENTENCE_BYTES = 1 << 30


def _training_sentences(texts: Iterable[str]) -> Iterator[str]:
    """Non-empty lines of every text: SentencePiece trains on lines ("sentences")."""
    for text in texts:
        if not isinstance(text, str):
            raise DataError(f"tokenizer training: texts must be strings, got {type(text).__name__}")
        for line in text.splitlines():
            if line.strip():
                yield line


def train_sentencepiece(
    texts: Iterable[str],
    vocab_size: int,
    model_prefix: str,
    *,
    character_coverage: float = 1.0,
    byte_fallback: bool = False,
) -> str:
    """Train a BPE SentencePiece model on ``texts``; write ``<model_prefix>.model``; return its path.

    Deterministic: the same texts and parameters give a byte-identical model. The real size may
    be below ``vocab_size`` when the corpus has fewer merges to offer (``hard_vocab_limit=False``).
    ``character_coverage=1.0`` keeps every character of the corpus; ``byte_fallback=True`` also
    spells unseen characters as bytes instead of ``<unk>`` (needs ``vocab_size`` >= 260 + chars).
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 5:
        raise DataError(
            f"tokenizer training: vocab_size must be an integer >= 5 (4 special pieces + text), got {vocab_size!r}"
        )
    sentences = list(_training_sentences(texts))
    if not sentences:
        raise DataError(
            f"tokenizer training for {model_prefix}: no text to train on (all texts empty); "
            "give shards / texts that contain text segments"
        )
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_piece="<pad>",
            unk_piece="<unk>",
            bos_piece="<s>",
            eos_piece="</s>",
            num_threads=1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            max_sentence_length=MAX_SENTENCE_BYTES,
            minloglevel=2,
        )
    except RuntimeError as exc:
        msg = str(exc).strip().rstrip(".")
        hint = ""
        if "smaller than required_chars" in msg:
            hint = (
                " The corpus has more distinct characters than the vocabulary has room for: raise "
                "--vocab-size (it must hold every character plus 4 special pieces)."
            )
        elif "byte_fallback" in msg or "Vocabulary size" in msg:
            hint = " Raise --vocab-size (byte_fallback alone needs 256 byte pieces)."
        raise DataError(f"tokenizer training for {model_prefix} failed: {msg}.{hint}") from None
    path = f"{model_prefix}.model"
    atomic_write(path, model.getvalue())
    return path


def builtin_tokenizer(cache_dir: str, texts: list[str], vocab_size: int) -> str:
    """The model trained on ``texts`` with ``vocab_size``, trained on first use into ``cache_dir``.

    Keyed on a hash of the texts, vocab size and training settings; concurrent callers each
    train the same bytes and rename them into place atomically, so any winner is correct.
    """
    digest = hashlib.sha256(f"v{TRAINING_VERSION}:{vocab_size}:{len(texts)}\0".encode())
    for text in texts:
        data = text.encode("utf-8")
        digest.update(f"{len(data)}:".encode())  # length prefix: ["ab", "c"] != ["a", "bc"]
        digest.update(data)
    prefix = os.path.join(cache_dir, f"tokenizer-{digest.hexdigest()[:20]}")
    path = f"{prefix}.model"
    if os.path.exists(path):
        return path
    return train_sentencepiece(texts, vocab_size, prefix)


class MultimodalTokenizer:
    """Text ids + ``<boi>`` / ``<eoi>`` + image codes (layout: module docstring).

    ``text`` is any :class:`~megafusion.data.tokenizers.text.TextTokenizer` (SentencePiece or
    Hugging Face); only its interface is used here.
    """

    def __init__(self, text: TextTokenizer, codec: ImageCodec):
        self.text = text
        self.codec = codec
        self._n_text = text.vocab_size

    @classmethod
    def from_files(cls, tokenizer_path: str, codec: ImageCodec) -> MultimodalTokenizer:
        """``tokenizer_path``: a SentencePiece ``.model``, a Hugging Face ``tokenizer.json`` or its directory."""
        return cls(load_text_tokenizer(tokenizer_path), codec)

    # --- layout ---------------------------------------------------------------------------------

    @property
    def text_vocab_size(self) -> int:
        return self._n_text

    @property
    def path(self) -> str:
        """The text tokenizer's file (for messages)."""
        return self.text.path

    @property
    def pad_id(self) -> int:
        return self.text.pad_id

    @property
    def bos_id(self) -> int:
        return self.text.bos_id

    @property
    def eos_id(self) -> int:
        return self.text.eos_id

    @property
    def boi_id(self) -> int:
        return self._n_text

    @property
    def eoi_id(self) -> int:
        return self._n_text + 1

    @property
    def image_offset(self) -> int:
        return self._n_text + 2

    @property
    def vocab_size(self) -> int:
        return self._n_text + 2 + self.codec.vocab_size

    def config(self) -> dict:
        """What must match between a dataset, a checkpoint and this tokenizer (the text tokenizer's
        content hash, not its path: the same file moved elsewhere still matches)."""
        return {
            **self.text.identity(),
            "n_text": self._n_text,
            "vocab_size": self.vocab_size,
            "codec": dict(self.codec.config()),
        }

    def check_compatible(self, other: dict, where: str, other_file: str | None = None) -> None:
        """DataError naming ``where`` (e.g. a dataset or checkpoint) if its tokenizer config differs.

        ``other_file``: the tokenizer file ``where`` was made with, when known (named in the message).
        """
        mine = self.config()
        keys = [*mine, *(k for k in other if k not in mine)]  # a key only one side has differs too
        diffs = [f"{k}: {other.get(k)!r} there, {mine.get(k)!r} here" for k in keys if other.get(k) != mine.get(k)]
        if diffs:
            made = f" ({other_file})" if other_file else ""
            raise DataError(
                f"{where}: made with a different tokenizer{made} than this one ({self.path}) "
                f"({'; '.join(diffs)}); use the same text tokenizer (SentencePiece model or Hugging "
                "Face tokenizer.json) and codec settings, or re-tokenize the data"
            )

    # --- encode / decode ------------------------------------------------------------------------

    def encode_text(self, text: str) -> list[int]:
        """Text ids of ``text`` (no bos / eos)."""
        return self.text.encode(text)

    def decode_text(self, ids) -> str:
        """The text of text ids (all ``< text_vocab_size``)."""
        return self.text.decode(ids)

    def encode_image(self, pixels: np.ndarray, source: str = "") -> np.ndarray:
        """Joint-vocabulary ids of the image codes (no ``<boi>`` / ``<eoi>``)."""
        codes = np.asarray(self.codec.encode(pixels))
        in_range = codes.size == 0 or (codes.min() >= 0 and codes.max() < self.codec.vocab_size)
        if codes.shape != (self.codec.tokens_per_image,) or not in_range:
            raise DataError(
                f"{source}: codec {self.codec.name!r} returned codes of shape {codes.shape} "
                f"outside [0, {self.codec.vocab_size}); the codec is broken"
            )
        return codes.astype(np.int64) + self.image_offset

    def encode_document(self, doc: Document) -> TokenizedDocument:
        tokens: list[np.ndarray] = [np.array([self.bos_id], dtype=np.int64)]
        modalities: list[np.ndarray] = [np.array([Modality.TEXT], dtype=np.uint8)]
        if not doc.segments:
            raise DataError(f"{doc.source or 'document'}: has no segments; a document needs text or images")
        for k, seg in enumerate(doc.segments):
            where = f"{doc.source or 'document'} segment {k}"
            if isinstance(seg, TextSegment):
                if not isinstance(seg.text, str):
                    raise DataError(f"{where}: text must be a string, got {type(seg.text).__name__}")
                ids = np.asarray(self.encode_text(seg.text), dtype=np.int64)
                tokens.append(ids)
                modalities.append(np.full(len(ids), Modality.TEXT, dtype=np.uint8))
            elif isinstance(seg, ImageSegment):
                try:
                    codes = self.encode_image(seg.pixels, where)
                except DataError as exc:
                    image = f" (image {seg.source})" if seg.source and seg.source != doc.source else ""
                    raise DataError(f"{where}{image}: {exc}") from None
                tokens += [np.array([self.boi_id], dtype=np.int64), codes, np.array([self.eoi_id], dtype=np.int64)]
                modalities += [
                    np.array([Modality.TEXT], dtype=np.uint8),
                    np.full(len(codes), Modality.IMAGE, dtype=np.uint8),
                    np.array([Modality.TEXT], dtype=np.uint8),
                ]
            else:
                raise DataError(
                    f"{where}: unknown segment type {type(seg).__name__}; expected TextSegment or ImageSegment"
                )
        tokens.append(np.array([self.eos_id], dtype=np.int64))
        modalities.append(np.array([Modality.TEXT], dtype=np.uint8))
        return TokenizedDocument(np.concatenate(tokens), np.concatenate(modalities), source=doc.source)

    def decode(self, tokens, source: str = "") -> list[Segment]:
        """Segments of a joint-vocabulary sequence. ``bos`` / ``eos`` / ``pad`` are dropped; an image
        span must be complete (``<boi>``, exactly ``tokens_per_image`` codes, ``<eoi>``)."""
        where = source or "decode"
        toks = np.asarray(tokens)
        if toks.ndim != 1 or not (toks.size == 0 or np.issubdtype(toks.dtype, np.integer)):
            raise DataError(f"{where}: tokens must be a 1-D integer sequence, got {toks.dtype} {tuple(toks.shape)}")
        toks = toks.astype(np.int64)
        if toks.size and (toks.min() < 0 or toks.max() >= self.vocab_size):
            raise DataError(
                f"{where}: token ids must be in [0, {self.vocab_size}), got min {toks.min()} max {toks.max()}"
            )
        segments: list[Segment] = []
        text_ids: list[int] = []
        skip = {self.pad_id, self.bos_id, self.eos_id}

        def flush_text():
            if text_ids:
                text = self.text.decode(text_ids)
                if text:
                    segments.append(TextSegment(text))
                text_ids.clear()

        n, per_image, i = len(toks), self.codec.tokens_per_image, 0
        while i < n:
            t = int(toks[i])
            if t == self.boi_id:
                flush_text()
                span = toks[i + 1 : i + 1 + per_image]
                is_code = span >= self.image_offset
                if len(span) < per_image or not is_code.all():
                    got = len(span) if is_code.all() else int(np.argmin(is_code))
                    after = "the end" if i + 1 + got >= n else "a text token"
                    raise DataError(
                        f"{where}: image starting at position {i} is truncated: {got} of "
                        f"{per_image} image tokens before {after}"
                    )
                end = i + 1 + per_image
                if end >= n or toks[end] != self.eoi_id:
                    raise DataError(
                        f"{where}: image starting at position {i} has {per_image} codes but no "
                        f"<eoi> after them (position {end})"
                    )
                segments.append(ImageSegment(self.codec.decode(span - self.image_offset), source=where))
                i = end + 1
            elif t == self.eoi_id:
                raise DataError(f"{where}: <eoi> at position {i} without a <boi> before it")
            elif t >= self.image_offset:
                raise DataError(f"{where}: image token {t} at position {i} outside any <boi> ... <eoi> span")
            else:
                if t not in skip:
                    text_ids.append(t)
                i += 1
        flush_text()
        return segments

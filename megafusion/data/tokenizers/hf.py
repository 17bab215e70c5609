"""A Hugging Face ``tokenizer.json`` as the joint tokenizer's text part (``tokenizers`` library).

So that a model imported from Hugging Face keeps its text token ids, nothing is renumbered:

- the text vocabulary is the tokenizer's whole vocabulary, added tokens included; megafusion's
  ``<boi>``, ``<eoi>`` and image ids are appended after it by ``MultimodalTokenizer``;
- text is encoded exactly as ``Tokenizer.encode(text, add_special_tokens=False)`` (=
  ``PreTrainedTokenizerFast.encode(text, add_special_tokens=False)``): no template bos, no
  truncation or padding (a saved ``tokenizer.json`` may carry either; both are switched off);
- ``bos`` / ``eos`` are the tokenizer's own: ``bos_token`` / ``eos_token`` of the
  ``tokenizer_config.json`` (else ``special_tokens_map.json``) next to ``tokenizer.json`` when it
  names them, else a known pair of its special tokens (``<|begin_of_text|>`` /
  ``<|end_of_text|>`` as in Llama-3, ``<s>`` / ``</s>``, ``<bos>`` / ``<eos>``); if neither
  tells, loading fails naming the file to add them to;
- ``pad`` is ``eos``: padding never enters the loss or attention (its document id is -1, see
  ``megafusion.data.packing``), so its id only has to be valid, and a new id would be an
  embedding row that is never trained.

The tokenizer is identified by the sha256 of ``tokenizer.json`` plus its bos / eos / pad ids
(those come from ``tokenizer_config.json`` and change the tokens as well).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from megafusion.core.errors import DataError

# Special-token pairs tried, in order, when no config file names bos / eos.
KNOWN_PAIRS = (("<|begin_of_text|>", "<|end_of_text|>"), ("<s>", "</s>"), ("<bos>", "<eos>"))
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def _token_content(value) -> str | None:
    """A config's ``bos_token`` entry: a string, an AddedToken dict (``{"content": ...}``) or null."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _configured_specials(folder: Path) -> dict[str, tuple[str, Path]]:
    """``{"bos": (token, file), "eos": ...}`` as the config files beside tokenizer.json name them."""
    found: dict[str, tuple[str, Path]] = {}
    for name in CONFIG_FILES:
        file = folder / name
        if not file.is_file():
            continue
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{file}: cannot read it as JSON ({exc}); fix or remove the file") from None
        if not isinstance(config, dict):
            raise DataError(f"{file}: expected a JSON object, got {type(config).__name__}; fix or remove the file")
        for kind in ("bos", "eos"):
            token = _token_content(config.get(f"{kind}_token"))
            if token is not None and kind not in found:  # tokenizer_config.json first
                found[kind] = (token, file)
    return found


class HuggingFaceText:
    """A ``tokenizers.Tokenizer`` loaded from ``tokenizer.json`` (layout: module docstring)."""

    def __init__(self, data: bytes, path: Path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise DataError(
                f"{path}: reading a Hugging Face tokenizer needs the `tokenizers` package: pip install tokenizers"
            ) from None
        try:
            # From the bytes that are hashed, so the hash is of exactly what was loaded.
            tok = Tokenizer.from_buffer(data)
        except Exception as exc:  # noqa: BLE001 - the Rust side raises a bare Exception
            raise DataError(
                f"{path}: not a valid Hugging Face tokenizer.json ({exc}); give the tokenizer.json "
                "that `tokenizer.save_pretrained(DIR)` writes, or a SentencePiece .model"
            ) from None
        tok.no_truncation()
        tok.no_padding()
        self._tok, self.path = tok, str(path)
        self.sha256 = hashlib.sha256(data).hexdigest()
        vocab = tok.get_vocab(with_added_tokens=True)
        # Added tokens may leave holes in the ids: the appended tokens start after the largest id.
        self.vocab_size = max(tok.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
        if self.vocab_size == 0:
            raise DataError(f"{path}: the tokenizer has an empty vocabulary; give a trained tokenizer.json")
        self.bos_id, self.eos_id = self._special_ids(path)
        self.pad_id = self.eos_id  # why: module docstring

    @classmethod
    def from_path(cls, path: str | Path) -> HuggingFaceText:
        """Load ``path``: a ``tokenizer.json`` file, or a directory holding one."""
        path = Path(path)
        if path.is_dir():
            if not (path / "tokenizer.json").is_file():
                raise DataError(
                    f"{path}: a directory without tokenizer.json; give the directory a Hugging Face "
                    "tokenizer was saved to (`tokenizer.save_pretrained(DIR)` writes tokenizer.json), "
                    "the tokenizer.json itself, or a SentencePiece .model"
                )
            path = path / "tokenizer.json"
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DataError(
                f"{path}: cannot read the Hugging Face tokenizer ({exc.strerror or exc}); check the "
                "path (a tokenizer.json, or the directory holding it)"
            ) from None
        return cls(data, path)

    def _special_ids(self, path: Path) -> tuple[int, int]:
        """(bos, eos): as the config files name them, else a known pair of special tokens."""
        configured = _configured_specials(path.parent)
        for kind, (token, file) in configured.items():
            if self._tok.token_to_id(token) is None:
                raise DataError(
                    f"{file}: {kind}_token {token!r} is not in the vocabulary of {path}; set it to "
                    f"one of the tokenizer's tokens (special tokens: {self._special_list()})"
                )
        special = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        guess = next(((b, e) for b, e in KNOWN_PAIRS if b in special and e in special), (None, None))
        ids = []
        for kind, guessed in zip(("bos", "eos"), guess):
            token = configured[kind][0] if kind in configured else guessed
            if token is None:
                tried = ", ".join(f"{b} / {e}" for b, e in KNOWN_PAIRS)
                raise DataError(
                    f"{path}: cannot tell its {kind} token: no {' or '.join(CONFIG_FILES)} next to it names a "
                    f"{kind}_token, and it has none of the special-token pairs {tried}. Add "
                    f'"bos_token": "...", "eos_token": "..." to {path.parent / CONFIG_FILES[0]} (a JSON object), '
                    f"naming tokens of the tokenizer (its special tokens: {self._special_list()})"
                )
            ids.append(self._tok.token_to_id(token))
        return ids[0], ids[1]

    def _special_list(self, limit: int = 20) -> str:
        names = [t.content for _, t in sorted(self._tok.get_added_tokens_decoder().items()) if t.special]
        more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
        return (", ".join(names[:limit]) + more) if names else "none"

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        # Special tokens other than bos / eos / pad (the joint tokenizer drops those) are kept:
        # they are part of the text the model wrote.
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def identity(self) -> dict:
        return {"hf_tokenizer_sha256": self.sha256, "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id}

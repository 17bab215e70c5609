"""Text and images from a checkpoint whose images are discrete tokens of the joint vocabulary (the
Chameleon setting, ``objective.name=lm``): :class:`TokenImageGenerator`, what ``megafusion
generate`` runs for such a checkpoint (its command line: :mod:`megafusion.commands.generate`).

    megafusion generate --ckpt CKPT --prompt "a red circle at the top left." [--prompt ...]
        --output DIR [--image] [--cfg 3.0] [--max-new-tokens 32] [--temperature 1]
        [--top-k 0] [--top-p 1] [--seed 0] [--no-kv-cache]

Text is continued as :class:`~megafusion.inference.decoding.Decoder` does (text ids and ``<boi>``
only). On ``<boi>`` exactly one image's worth of tokens follows (``tokens_per_image`` of the
data's codec), each sampled from the image ids only (``--temperature``, ``--top-k``, ``--top-p``;
greedy at temperature 0), then ``<eoi>`` is forced and text resumes. The codes (id -
``image_offset``) are decoded by the data's codec (pixel patches, k-means VQ, a diffusers
VQModel) to pixels.

Classifier-free guidance (``--cfg``, 1 = off) on the image tokens' logits:
``uncond + cfg * (cond - uncond)``, where the unconditional view is the same sequence with the
caption hidden from the image's tokens and its ``<boi>`` (the view caption dropout trains:
``objective.caption_dropout``; a model trained without it has never seen that view, and guidance
then extrapolates from an untrained distribution).

KV cache: megatron-core's ``StaticInferenceContext`` per view. The conditional cache runs one
position per token, text and image alike; the unconditional one is made for each image, brought up
to just before its ``<boi>`` (those positions are the same in both views), then runs ``<boi>`` and
one image position per token under the caption-hidden mask. ``--no-kv-cache`` recomputes the
whole sequence at every token, in both views (the reference the cache is tested against).
"""

from __future__ import annotations

import numpy as np
import torch

from megafusion.inference.decoding import Decoder, Sequence
from megafusion.inference.sampling import sample_token


class TokenImageGenerator(Decoder):
    """A language model over the joint vocabulary (an unwrapped ``GPTModel``), its tokenizer and
    the data's discrete image codec."""

    @staticmethod
    def generates(objective) -> bool:
        return bool(objective.image_tokens)

    def _forward(self, seq: Sequence, start: int, cache, hide: int | None = None):
        """``(logits of the last position, None)`` of positions ``start ..`` of ``seq`` (see
        :meth:`Decoder._run`), in the view that hides the caption from image ``hide``."""
        image_ids, mask = self._view(seq, start, hide)
        logits = self._run(seq, start, cache, mask, image_ids[:, start:])
        return logits[0, -1], None

    def image_logits(self, seq: Sequence, cache, hide: int | None, start: int) -> torch.Tensor:
        """fp32 logits over the image ids (``[codec vocab]``) for the position after ``seq``."""
        tok = self.tokenizer
        logits = self._forward(seq, start, cache, hide)[0]
        return logits[tok.image_offset : tok.vocab_size].float()

    def _image(self, seq: Sequence, cache, args, gen):
        """Sample one image's tokens after the ``<boi>`` that ends ``seq``, append them and ``<eoi>``."""
        tok, guidance = self.tokenizer, args.cfg
        boi, k = len(seq.tokens) - 1, len(seq.spans)
        seq.spans.append((boi + 1, boi + 1 + self.patches))
        uncond, hidden_cached = None, 0
        if guidance != 1.0 and cache is not None:
            # Positions before <boi> are the same in both views: one forward fills them.
            uncond = self.new_cache()
            self._forward(seq.prefix(boi), 0, uncond)
            hidden_cached = boi
        for _ in range(self.patches):
            logits = self.image_logits(seq, cache, None, seq.cached)
            if cache is not None:
                seq.cached = len(seq.tokens)
            if guidance != 1.0:
                hidden = self.image_logits(seq, uncond, k, hidden_cached)
                if uncond is not None:
                    hidden_cached = len(seq.tokens)
                logits = hidden + guidance * (logits - hidden)
            seq.tokens.append(tok.image_offset + sample_token(logits, args, gen))
        codes = np.asarray(seq.tokens[boi + 1 :], dtype=np.int64) - tok.image_offset
        seq.tokens.append(tok.eoi_id)
        return tok.codec.decode(codes)

    def image_nll(self, caption: str, codes: np.ndarray, hide: bool = False) -> float:
        """Mean negative log-likelihood per image token of the image ``codes`` right after
        ``<bos>`` + ``caption`` + ``<boi>`` (one full forward; ``hide``: in the unconditional view)."""
        tok = self.tokenizer
        prompt = [tok.bos_id, *tok.encode_text(caption), tok.boi_id]
        ids = [*prompt, *(int(c) + tok.image_offset for c in codes)]
        seq = Sequence(ids, [(len(prompt), len(ids))])
        image_ids, mask = self._view(seq, 0, 0 if hide else None)
        logits = self._run(seq, 0, None, mask, image_ids)[0, len(prompt) - 1 : -1, : tok.vocab_size].float()
        targets = torch.as_tensor(ids[len(prompt) :], device=logits.device)
        return float(torch.nn.functional.cross_entropy(logits, targets))

"""What the two generators of ``megafusion generate`` share: :class:`Decoder`, a model run one
sequence at a time (with or without megatron-core's KV cache), its views of the sequence, and the
text loop that calls the generator's image step on ``<boi>``.

The generators (:class:`~megafusion.inference.generate.Generator`, Transfusion's continuous
latents; :class:`~megafusion.inference.token_images.TokenImageGenerator`, discrete image tokens
of the LM objective) differ only in what an image is and how it is sampled.

The views. The conditional view is the training mask: causal over the sequence (plus
bidirectional inside each image for an objective whose images are denoised whole,
``bidirectional_images``). The unconditional view of image ``k`` (``hide=k``) hides the caption
from that image's positions *and* from its ``<boi>`` (a text token that reads the caption, whose
keys would otherwise carry it to the image from the second layer on): they see ``<bos>``,
``<boi>`` and the image only, exactly what caption dropout trains
(:func:`megafusion.objectives.captions.caption_dropout`, :func:`megafusion.layers.masks.dense_mask`'s
``first_key``).

Several documents. A sequence may hold several documents, each starting at its ``<bos>``
(``sample``'s ``args.context``: earlier documents, each ``<bos> text <eos>``, before the prompt's
own). Both views follow the checkpoint's ``data.attention`` (:mod:`megafusion.layers.masks`):
``isolated``, a document sees only itself (the earlier ones change nothing); ``causal``, every
earlier token of the sequence, as the model was trained. ``data.positions=document`` rotates each
token at its position within its document (:mod:`megafusion.models.token_positions`), with or
without the KV cache (the cache's table is read at all of its slots' positions).
"""

from __future__ import annotations

import abc
import contextlib
import os
from dataclasses import dataclass, field

import torch

from megafusion.inference.sampling import sample_token


@dataclass
class Sequence:
    """One generation's state: its tokens, image spans ``(start, end)`` (an image being sampled
    token by token may have fewer tokens yet), finished image latents ``[1, C, H, W]``
    (Transfusion), and how many leading positions hold valid keys in the KV cache."""

    tokens: list[int]
    spans: list[tuple[int, int]] = field(default_factory=list)
    latents: list[torch.Tensor] = field(default_factory=list)
    cached: int = 0

    def prefix(self, n: int) -> Sequence:
        """The first ``n`` positions (images that end by then, with their latents)."""
        spans = [span for span in self.spans if span[1] <= n]
        return Sequence(self.tokens[:n], spans, self.latents[: len(spans)])


class Decoder(abc.ABC):
    """A model (an unwrapped ``GPTModel`` of one process), its joint tokenizer and config; a
    generator subclasses it with its image step (:meth:`_image`) and :meth:`_forward`."""

    bidirectional_images = False  # whether an image's positions see each other (Transfusion)

    def __init__(self, cfg, runtime, tokenizer, model, kv_cache: bool = True):
        from megafusion.models.registry import causal_routing

        if not causal_routing(cfg):
            # E.g. expert choice ranks a microbatch's tokens against each other (later ones included):
            # one decoded token would be taken by every expert of its group.
            raise ValueError(
                f"model.arch={cfg.model.arch}: its routing is not causal (a token's computation depends on "
                f"later tokens), so it cannot generate token by token; train it with causal predictors of its "
                f"routing (MoMa: moe.aux_router=true; Mixture-of-Depths: mod.aux_router=true; or "
                f"train.trainable=aux_routers from this checkpoint)"
            )
        self.cfg, self.runtime, self.tokenizer, self.model = cfg, runtime, tokenizer, model
        self.kv_cache = kv_cache
        self.patches = tokenizer.codec.tokens_per_image  # sequence positions per image

    @staticmethod
    @abc.abstractmethod
    def generates(objective) -> bool:
        """Whether this generator samples the images of checkpoints of ``objective`` (its spec)."""

    @classmethod
    def from_checkpoint(cls, ckpt, kv_cache: bool = True):
        """The generator of checkpoint ``ckpt`` (a path, or a
        :class:`~megafusion.inference.load.CheckpointRun`), its model loaded with the run's data
        (which gives the tokenizer and the image codec)."""
        from megafusion.inference.load import checkpoint_config, model_from_checkpoint

        source = checkpoint_config(ckpt) if isinstance(ckpt, (str, bytes, os.PathLike)) else ckpt
        refuse_unless(cls, source)
        loaded = model_from_checkpoint(source, data=True)
        if loaded.data.tokenizer is None:
            from megafusion import checkpoint as ck

            raise ck.CheckpointError(
                f"{source.path} was trained on data.source={loaded.cfg.data.source} (token ids without a "
                f"tokenizer): generation needs a checkpoint trained on text and images through a tokenizer"
            )
        return cls(loaded.cfg, loaded.runtime, loaded.data.tokenizer, loaded.chunks[0], kv_cache)

    def new_cache(self):
        """A megatron-core static KV cache for one sequence of up to ``model.seq_length`` positions
        (None when the generator recomputes everything)."""
        if not self.kv_cache:
            return None
        from megatron.core.inference.contexts import StaticInferenceContext

        context = StaticInferenceContext(max_batch_size=1, max_sequence_length=self.cfg.model.seq_length)
        # Every run position's logits (or image prediction), not only the last token's.
        context.materialize_only_last_token_logits = False
        return context

    # --- one forward pass over the uncached part of a sequence ---------------------------------

    def _documents(self, seq: Sequence) -> torch.Tensor:
        """``[1, s]`` document ids of ``seq``: a new document at each ``<bos>`` (0 before the first)."""
        bos = torch.tensor([seq.tokens]) == self.tokenizer.bos_id
        return (bos.to(torch.int64).cumsum(dim=1) - 1).clamp(min=0)

    def _view(self, seq: Sequence, start: int, hide: int | None):
        """``(image ids [1, s] (-1 outside images), mask rows of positions start .. s-1)`` of ``seq``
        in the conditional view, or the unconditional view of image ``hide``."""
        from megafusion.layers.masks import dense_mask

        s = len(seq.tokens)
        image_ids = torch.full((1, s), -1, dtype=torch.int64)
        first_key = torch.zeros_like(image_ids)
        for k, (a, b) in enumerate(seq.spans):
            image_ids[0, a:b] = k
            if k == hide:
                first_key[0, a - 1 : b] = a - 1  # the image's <boi> and its positions start at that <boi>
        bidirectional = image_ids if self.bidirectional_images else None
        cross = self.cfg.data.cross_document()
        mask = dense_mask(self._documents(seq), bidirectional, first_key, first_query=start, cross_document=cross)
        return image_ids, mask.to(self.runtime.device)

    def _run(self, seq: Sequence, start: int, cache, mask, image_ids, **extra):
        """The model's output for positions ``start ..`` of ``seq`` (keys: every position up to the
        last one; with a ``cache`` those before ``start`` come from it and the run ones are written
        into it, overwriting; without one ``start`` must be 0). ``image_ids`` ``[1, s - start]``
        gives each run position's modality (routed families read it)."""
        from megafusion.core.modality import Modality
        from megafusion.layers.masks import document_positions
        from megafusion.layers.routing import routing_for
        from megafusion.models.registry import routed
        from megafusion.models.token_positions import token_positions

        if cache is None and start:
            raise ValueError("without a KV cache every forward starts at position 0")
        device, s = self.runtime.device, len(seq.tokens)
        modality = torch.where(image_ids >= 0, int(Modality.IMAGE), int(Modality.TEXT))
        ids = torch.tensor([seq.tokens[start:]], dtype=torch.int64, device=device)
        position_ids = torch.arange(start, s, device=device)[None]
        if cache is not None:
            cache.sequence_len_offset = start
        # Causal routing: each token is routed from its own state, as when it was generated.
        routing = routing_for({"modality_ids": modality}, device, causal=True) if routed(self.cfg) else None
        positions = None
        if self.cfg.data.positions == "document":
            positions = document_positions(self._documents(seq))
            if cache is not None:  # megatron reads the table at the cache's slots: one position per slot
                positions = torch.nn.functional.pad(positions, (0, cache.max_sequence_length - s))
            positions = positions.to(device)
        with torch.no_grad(), routing or contextlib.nullcontext(), token_positions(positions):
            return self.model(
                ids, position_ids, mask, labels=None, inference_context=cache, runtime_gather_output=True, **extra
            )

    @abc.abstractmethod
    def _forward(self, seq: Sequence, start: int, cache, hide: int | None = None):
        """``(logits of the last position, what the generator adds)`` of positions ``start ..``."""

    @abc.abstractmethod
    def _image(self, seq: Sequence, cache, args, gen: torch.Generator):
        """Append one image after the ``<boi>`` that ends ``seq`` (its positions and ``<eoi>``);
        return its pixels (uint8 ``[H, W, 3]``)."""

    # --- the text loop ---------------------------------------------------------------------------

    def _text_token(self, logits: torch.Tensor, args, gen: torch.Generator) -> int:
        """The next token outside an image: a text id or ``<boi>``, never an image id or ``<eoi>``
        (nor the vocabulary's padding rows)."""
        tok = self.tokenizer
        allowed = torch.full_like(logits[: tok.vocab_size], float("-inf"), dtype=torch.float32)
        allowed[: tok.text_vocab_size] = 0.0
        allowed[tok.boi_id] = 0.0
        return sample_token(logits[: tok.vocab_size].float() + allowed, args, gen)

    def sample(self, prompt: str, args, gen: torch.Generator) -> tuple[Sequence, list[int], list]:
        """``<bos>`` + ``prompt``, continued token by token (``args``: ``max_new_tokens``,
        ``image`` (force ``<boi>`` right after the prompt), ``temperature``, ``top_k``, ``top_p``,
        optionally ``context`` (texts of earlier documents, each ``<bos> text <eos>`` before the
        prompt's document) and the generator's image options) until ``<eos>``, the token budget or the sequence's
        room runs out; each ``<boi>`` is followed by one image. Returns (the sequence, its
        generated text ids, the images' pixels)."""
        tok = self.tokenizer
        earlier = [
            t for text in getattr(args, "context", None) or () for t in (tok.bos_id, *tok.encode_text(text), tok.eos_id)
        ]
        seq = Sequence([*earlier, tok.bos_id, *tok.encode_text(prompt)])
        cache = self.new_cache()
        images, text_ids = [], []
        force_image = args.image
        for _ in range(args.max_new_tokens + 1):
            if force_image:
                token, force_image = tok.boi_id, False
            else:
                logits = self._forward(seq, seq.cached, cache)[0]
                seq.cached = len(seq.tokens) if cache is not None else 0
                token = self._text_token(logits, args, gen)
            if token == tok.eos_id or len(seq.tokens) >= self.cfg.model.seq_length - self.patches - 2:
                break
            seq.tokens.append(token)
            if token == tok.boi_id:
                images.append(self._image(seq, cache, args, gen))
            else:
                text_ids.append(token)
        return seq, text_ids, images

    def generate(self, prompt: str, args, gen: torch.Generator) -> tuple[str, list]:
        """(the generated text, the images' pixels) of :meth:`sample`."""
        _, text_ids, images = self.sample(prompt, args, gen)
        return self.tokenizer.decode_text(text_ids), images


def refuse_unless(generator, source) -> None:
    """CheckpointError unless ``generator`` (a class, or a tuple of them) samples the images of the
    checkpoint ``source`` (a :class:`~megafusion.inference.load.CheckpointRun`), asked of its
    objective's spec."""
    from megafusion import checkpoint as ck
    from megafusion.objectives.registry import get_objective, objective_names

    generators = generator if isinstance(generator, tuple) else (generator,)
    name = source.cfg.objective.name
    if not any(g.generates(get_objective(name)) for g in generators):
        able = ", ".join(n for n in objective_names() if any(g.generates(get_objective(n)) for g in generators))
        raise ck.CheckpointError(
            f"{source.path} was trained with objective.name={name!r}; images can only be "
            f"sampled from checkpoints of an objective that generates them ({able})"
        )

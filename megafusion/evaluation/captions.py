"""Held-out loss per modality and caption consistency of generated images: what ``megafusion eval``
runs (its command line: :mod:`megafusion.commands.eval`).

    megafusion eval --ckpt CKPT [--samples 60] [--steps 25] [--cfg 3.0] [--sampler ddim]
        [--seed 0] [--output DIR]
    [torchrun --nproc-per-node N -m megafusion] eval --ckpt CKPT --text FILE
        [--tokenizer PATH] [--seq-length N] [--batch 4] [--loss-vocab N] [section.key=value ...]

With ``--text``: the mean next-token loss of any LM or Transfusion checkpoint (dense or MoT, any
parallel layout) on a plain text file, e.g. to check a Hugging Face import against
transformers; see :mod:`megafusion.evaluation.text`, which runs it. Without it:

For a checkpoint trained on the built-in captioned shapes whose objective generates images
(Transfusion's denoised latents, or the LM objective's discrete image tokens: the generator is
picked by :mod:`megafusion.inference.generators`): the validation loss of its held-out split per
modality (text and image LM loss, or text LM loss and diffusion loss; ``eval.batches`` global
batches) and each domain's (``domains``: every set of ``data.builtin``, its held-out documents
alone, docs/data.md "Domains"), then ``--samples`` captions drawn from the shapes generator with a seed the training
data did not use; for each, an image is generated from the caption (``megafusion generate``'s
sampler with classifier-free guidance: ``--sampler`` / ``--steps`` for latents, ``--temperature``
/ ``--top-k`` / ``--top-p`` for tokens) and read back by ``read_shape`` (a checker, not a learned
model: nearest palette colour, mass distribution, centroid cell). Accuracy is the fraction of
images whose colour / shape / position (and all three) match the caption, with the chance levels
of each attribute beside them. ``caption_gap``, without sampling (a model that ignores its
captions scores the same under each): for latents, the diffusion loss of the same held-out images
under their own caption and under another's, at a few noise levels; for tokens, the mean
negative log-likelihood per image token of their codes under their own caption, another's, and
none (the unconditional view). One JSON object goes to stdout; ``--output`` also keeps the PNGs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

HELD_OUT_SEED_OFFSET = 7919  # captions from a stream the training set (train.seed) never drew
GAP_NOISE_LEVELS = (0.3, 0.6, 0.9)  # fractions of the training noise range (1 = pure noise)


def held_out_samples(num: int, train_seed: int):
    """``(ShapeSpec, caption)`` pairs from the shapes generator under a seed training did not use."""
    from megafusion.data.builtin.shapes import _sample

    return [(spec, text) for spec, text, _ in (_sample(train_seed + HELD_OUT_SEED_OFFSET, i) for i in range(num))]


def held_out_captions(num: int, train_seed: int):
    """``(caption, attributes)`` pairs of :func:`held_out_samples`."""
    return [(text, spec.attributes()) for spec, text in held_out_samples(num, train_seed)]


def caption_gap(predict, encode, samples, schedule, levels=GAP_NOISE_LEVELS, seed: int = 0) -> dict:
    """Diffusion loss of held-out images under their own caption and under another image's.

    ``predict(caption, x_t, model_t)`` is the model's prediction for the latent ``x_t``
    ``[1, C, H, W]`` after ``caption``; ``encode(spec)`` the latent of a spec's rendered image;
    ``samples`` ``(spec, caption)`` pairs. At each noise level (a fraction of the training
    timesteps) every image is noised once and scored with its caption and with the next
    sample's: a model that reads its captions has the lower loss under the matching one; equal
    losses mean the caption is ignored. Cheap (two forwards per image and level, no sampling),
    and it isolates what sampling accuracy mixes with sampler error.
    """
    T = schedule.num_train_timesteps
    out = {"noise_level": list(levels), "matching": [], "mismatched": []}
    for level in levels:
        t = torch.tensor([level]) if schedule.is_flow else torch.tensor([round(level * (T - 1))])
        sums = {"matching": 0.0, "mismatched": 0.0}
        for i, (spec, caption) in enumerate(samples):
            x0 = torch.as_tensor(encode(spec)).float()[None]
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
            x_t, target = schedule.add_noise(x0, noise, t), schedule.target(x0, noise, t)
            other = samples[(i + 1) % len(samples)][1]
            for key, text in (("matching", caption), ("mismatched", other)):
                pred = predict(text, x_t, schedule.model_timesteps(t))
                sums[key] += float((pred.float().cpu() - target).square().mean())
        for key, total in sums.items():
            out[key].append(total / max(len(samples), 1))
    return out


def consistency(pairs, generate_image, out: Path | None = None) -> dict:
    """Accuracy of ``read_shape(generate_image(caption))`` against each caption's attributes."""
    from megafusion.data.builtin.shapes import PALETTE, POSITIONS, SHAPES, read_shape

    keys = ("colour", "shape", "position")
    hits = {k: 0 for k in (*keys, "all")}
    for i, (text, want) in enumerate(pairs):
        image = generate_image(i, text)
        if out is not None:
            from PIL import Image

            Image.fromarray(image).save(out / f"{i:04d}.png")
        got = read_shape(image)
        match = {k: got[k] == want[k] for k in keys}
        for k in keys:
            hits[k] += match[k]
        hits["all"] += all(match.values())
    n = max(len(pairs), 1)
    chance = {"colour": 1 / len(PALETTE), "shape": 1 / len(SHAPES), "position": 1 / len(POSITIONS)}
    chance["all"] = chance["colour"] * chance["shape"] * chance["position"]
    return {"samples": len(pairs), "accuracy": {k: v / n for k, v in hits.items()}, "chance": chance}


def token_caption_gap(generator, samples, image_size: int) -> dict:
    """Mean negative log-likelihood per image token of held-out images (their codes under the
    run's codec) after their own caption, after the next sample's caption, and in the
    unconditional view (the caption hidden, as caption dropout trains it): the discrete-token
    counterpart of :func:`caption_gap` (a model that ignores its captions scores the same under
    all three; one forward each, no sampling)."""
    from megafusion.data.builtin.shapes import render_shape

    tok = generator.tokenizer
    sums = {"matching": 0.0, "mismatched": 0.0, "unconditional": 0.0}
    for i, (spec, caption) in enumerate(samples):
        codes = tok.encode_image(render_shape(spec, image_size)) - tok.image_offset
        other = samples[(i + 1) % len(samples)][1]
        sums["matching"] += generator.image_nll(caption, codes)
        sums["mismatched"] += generator.image_nll(other, codes)
        sums["unconditional"] += generator.image_nll(caption, codes, hide=True)
    return {key: total / max(len(samples), 1) for key, total in sums.items()}


def latent_caption_gap(generator, samples, image_size: int, seed: int) -> dict:
    """:func:`caption_gap` of a generator of denoised latents."""
    from megafusion.data.builtin.shapes import render_shape

    encode = lambda spec: generator.latent.encode(render_shape(spec, image_size))  # noqa: E731
    return caption_gap(generator.image_prediction, encode, samples, generator.schedule, seed=seed)


def domain_report(val: dict) -> dict:
    """``{domain: {"loss": ..., "loss/<modality>": ..., "tokens": ...}}`` from an evaluation's
    ``val/domain/<domain>/...`` keys."""
    out: dict[str, dict] = {}
    for key, value in val.items():
        if key.startswith("val/domain/"):
            name, metric = key.removeprefix("val/domain/").split("/", 1)
            out.setdefault(name, {})[metric] = value
    return out


def evaluate(args) -> dict:
    """The report ``megafusion eval`` prints; ``args``: its options (``ckpt``, ``samples``, ``steps``,
    ``cfg``, ``sampler``, ``temperature``, ``top_k``, ``top_p``, ``seed``, ``out``)."""
    from megafusion import checkpoint as ck
    from megafusion.inference.generate import Generator
    from megafusion.inference.generators import generator_class
    from megafusion.inference.load import checkpoint_config, model_from_checkpoint
    from megafusion.runtime.seed import seed_everything
    from megafusion.training.trainer import Trainer

    source = checkpoint_config(args.ckpt, ["logging.wandb=false", "checkpoint.save=false"])
    generator_type = generator_class(source)  # refuses a checkpoint whose objective samples no images
    path, cfg = source.path, source.cfg
    if "shapes" not in cfg.data.builtin or cfg.data.source != "builtin":
        raise ck.CheckpointError(
            f"{path} was not trained on the built-in shapes (data.builtin={cfg.data.builtin!r}): "
            "caption consistency needs the shapes captions and checker"
        )
    trainers = []

    def with_trainer(run_cfg, runtime):
        # The validation loss is the trainer's own evaluation (its microbatches, caption handling
        # and reduction over ranks), so it is the number training logs as val/loss.
        seed_everything(run_cfg.train.seed)
        trainers.append(Trainer(run_cfg, runtime))
        return trainers[0].model, trainers[0].data

    loaded = model_from_checkpoint(source, build=with_trainer)
    trainer, runtime, step = trainers[0], loaded.runtime, loaded.step
    val = trainer.evaluate(step) or {}
    # Every domain's held-out loss (data.domains' runs log it as val/domain/...; the others are
    # evaluated once more, domain by domain, so that a mixture's checkpoint reports it too).
    per_domain = val if cfg.data.domains else trainer.evaluate(step, per_domain=True) or {}
    model = trainer.model[0].module
    generator = generator_type(cfg, runtime, trainer.data.tokenizer, model.eval())
    options = argparse.Namespace(
        image=True,
        max_new_tokens=0,
        sampler=args.sampler,
        steps=args.steps,
        cfg=args.cfg,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
    )

    def generate_image(i: int, text: str):
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + i)
        return generator.generate(text, options, gen)[1][0]

    out = None
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
    result = consistency(held_out_captions(args.samples, cfg.train.seed), generate_image, out)
    samples, size = held_out_samples(args.samples, cfg.train.seed), cfg.data.image_size
    if generator_type is Generator:  # denoised latents: diffusion loss at noise levels; sampler options
        gap = latent_caption_gap(generator, samples, size, args.seed)
        sampling = {"sampler": args.sampler, "steps": args.steps, "cfg": args.cfg, "seed": args.seed}
    else:  # discrete tokens: their likelihood; token sampling options
        gap = token_caption_gap(generator, samples, size)
        sampling = {"cfg": args.cfg, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
        sampling["seed"] = args.seed
    return {
        "checkpoint": str(path),
        "step": step,
        "validation": {k: v for k, v in val.items() if k != "step"},
        "domains": domain_report(per_domain),
        "caption_consistency": result,
        "caption_gap": gap,
        "sampling": sampling,
    }

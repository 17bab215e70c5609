"""What an objective is to the trainer, the forward step, checkpointing and accounting: ``Objective``.

An objective (``objective.name``) is one module under ``megafusion/objectives/`` that defines
``OBJECTIVE``, an instance of an ``Objective`` subclass, and one line in
:mod:`megafusion.objectives.registry`. Every objective trains the next-token LM loss of the
text (and discrete image) tokens; what it adds:

- ``model_class(cfg, latent_shape)``: the ``GPTModel`` subclass and its extra constructor
  arguments (Transfusion: the image modules), and ``extra_modules``, their attribute names
  (a warm start from a checkpoint without them initialises them);
- ``needs_stage_channel(cfg)``: whether the first and last pipeline stage exchange tensors
  outside megatron's schedule (:mod:`megafusion.runtime.stage_channel`), opened at model build;
- ``manifest_key(cfg)``: what a checkpoint records of it (None: nothing, a plain LM);
- ``prepare_step(...)``: host-side work per optimizer step on the step's microbatches (loss
  normalisers of the whole global batch, caption dropout), identical in every layout;
- ``forward_inputs(cfg, batch, device)``: extra keyword arguments of the model call, and what
  the loss needs; ``loss(lm_total, extra_output, context)``: the loss to backpropagate and
  the sums behind ``report_fields`` (reduced over microbatches and ranks by the trainer);
  ``metrics(sums, prefix)``: the ``metrics.jsonl`` values made from them;
- ``flops_inputs(batch, cross_document)``: what accounting needs to count a microbatch exactly
  (the keys each query attends under the objective's mask, in the ``data.attention`` mode, the
  images that run the extra modules);
  ``accounting_modules(cfg, latent_shape)``: name -> ``(module, run)``, each extra module built
  on the meta device and ``run()`` one image's forward through it (data inputs without gradient,
  as in the model), which accounting measures (:mod:`megafusion.accounting.image_modules`);
- for the planner (:mod:`megafusion.planning.memory`): ``module_stages`` (which pipeline stage holds
  each extra module), ``latent_shape(cfg)`` (one latent's shape when the config says it) and
  ``activation_bytes_per_image_token(cfg, latent_shape, element_bytes)``.

- ``options``: its config keys (joining the ``objective`` section or sections of their own) and
  their checks, a :class:`~megafusion.core.options.Options` (a built-in objective's live in a
  torch-free companion module, e.g. :mod:`megafusion.objectives.transfusion_options`).

What the tools that run a checkpoint ask of it (instead of its name):

- ``image_latents``: its images are continuous latents (the data carries them beside the
  tokens, ``megafusion.data.sources``) that its model denoises, its image modules built for one
  latent's shape ``[C, H, W]``: ``megafusion generate`` and ``megafusion eval`` sample images from
  its checkpoints only, and a tool that builds its model without the
  run's data (the logits tool, ``eval --text``) reads that shape off the checkpoint's config
  (:mod:`megafusion.inference.load`);
- ``image_tokens``: its images are discrete codes of the data's image codec in the joint
  vocabulary, trained by the LM loss (the Chameleon setting): ``megafusion generate`` and
  ``megafusion eval`` sample them token by token (:mod:`megafusion.inference.token_images`).
"""

from __future__ import annotations

from megafusion.core.options import NO_OPTIONS


class Objective:
    name = ""
    options = NO_OPTIONS  # its config keys and checks (a built-in one's come from a torch-free companion)
    report_fields: tuple[str, ...] = ()
    extra_modules: tuple[str, ...] = ()
    # extra module -> the pipeline stage that holds it ("first": with the embedding, "last": with
    # the output layer), which the planner charges its parameters to
    module_stages: dict[str, str] = {}
    image_latents = False
    image_tokens = False

    def model_class(self, cfg, latent_shape: tuple[int, int, int] | None):
        from megatron.core.models.gpt import GPTModel

        return GPTModel, {}

    def needs_stage_channel(self, cfg) -> bool:
        return False

    def manifest_key(self, cfg) -> str | None:
        return None

    def prepare_step(self, cfg, source, first_sample: int, batches: list[dict], training: bool) -> None:
        """Add host-side per-step values to ``batches`` (this rank's microbatches of the step
        that starts at global sample ``first_sample``); nothing for a plain LM."""

    def forward_inputs(self, cfg, batch: dict, device) -> tuple[dict, object]:
        return {}, None

    def loss(self, lm_total, extra_output, context):
        """``(loss sum for megatron, [len(report_fields)] tensor of sums)`` of one microbatch."""
        return lm_total, lm_total.new_zeros(len(self.report_fields))

    def metrics(self, sums: dict, prefix: str) -> dict:
        return {}

    def flops_inputs(self, batch: dict, cross_document: bool = False) -> dict:
        """Keywords for :func:`megafusion.accounting.flops.batch_flops` beyond tokens and modalities
        (``cross_document``: ``data.attention=causal``, for keys counted here)."""
        return {"image_ids": batch["image_ids"]} if "image_ids" in batch else {}

    def accounting_modules(self, cfg, latent_shape: tuple[int, int, int] | None) -> dict:
        return {}

    def latent_shape(self, cfg) -> tuple[int, int, int] | None:
        """One image latent's ``[C, H, W]`` when the config alone says it; None without latents, or
        when the autoencoder decides it (a caller then passes the codec's)."""
        return None

    def activation_bytes_per_image_token(self, cfg, latent_shape, element_bytes: int) -> dict[str, float]:
        """Bytes its extra modules save for backward per image token, on the ``first`` and the
        ``last`` pipeline stage (the planner's activation memory; 0 without extra modules)."""
        return {"first": 0.0, "last": 0.0}

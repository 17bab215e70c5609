"""Diffusion objective for continuous image latents (Transfusion, arXiv 2408.11039).

What is here, and what is borrowed:

- ``NoiseSchedule``: the forward process and the regression target. For ``epsilon``,
  ``v_prediction`` and ``sample`` (the clean latent x0) it holds a diffusers ``DDPMScheduler`` and
  uses its ``alphas_cumprod``, ``add_noise`` and ``get_velocity``, so the numbers are diffusers' by
  construction. For
  ``flow`` (rectified flow) it is the closed form ``x_t = (1 - t) x0 + t noise``, target
  ``noise - x0``, with continuous ``t`` in ``[0, 1]``; diffusers has no training-side helper
  for that.
- ``diffusion_loss_sums``: masked / weighted squared error returned as *sums* plus the counts
  to divide by, like ``lm_loss_sums``, so the mean is the same whatever the microbatch and
  data-parallel split.
- ``make_sampler`` / ``denoise``: a sampling loop around diffusers' ``DDPMScheduler`` /
  ``DDIMScheduler`` (built from the training schedule's config) with classifier-free
  guidance, and a plain Euler integrator for flow.

Timesteps: ``epsilon`` / ``v_prediction`` use integer timesteps ``0 .. T-1`` (``T =
num_train_timesteps``; larger = noisier); ``flow`` uses float ``t`` in ``[0, 1]`` (1 = pure
noise). What the *model* sees is ``NoiseSchedule.model_timesteps(t)``: always a float in
``[0, T]`` (``t * T`` for flow), and ``denoise`` hands ``model_fn`` the same kind of value.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

SCHEDULES = {"cosine": "squaredcos_cap_v2", "linear": "linear"}
PREDICTIONS = ("epsilon", "v_prediction", "sample", "flow")
SAMPLERS = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler"}  # diffusers classes, imported when used
FLOW_SAMPLERS = ("euler",)
TIMESTEP_SPACINGS = ("trailing", "leading", "linspace")


def _choice_error(what: str, value, choices) -> ValueError:
    return ValueError(f"unknown {what} {value!r}: choose one of {', '.join(repr(c) for c in choices)}")


class NoiseSchedule:
    """Forward noising process and training target, from config values.

    schedule: ``cosine`` (diffusers ``squaredcos_cap_v2``: Nichol & Dhariwal's cosine
    alpha-bar, betas capped at 0.999) or ``linear`` (DDPM: betas linear from ``beta_start``
    to ``beta_end``); ignored for ``flow``, whose path is fixed.
    prediction: ``epsilon``, ``v_prediction``, ``sample`` (x0: the squared error then weighs
    every noise level alike in latent space, where epsilon's shrinks the high-noise levels,
    which decide the layout an image's caption asks for, by their tiny SNR) or ``flow``.

    Attributes: ``num_train_timesteps``, ``prediction``, ``scheduler`` (the diffusers
    ``DDPMScheduler``; None for flow), ``betas`` and ``alphas_cumprod`` (float64 copies of
    diffusers' float32 values, ``[T]``; None for flow).
    """

    def __init__(
        self,
        schedule: str = "cosine",
        num_train_timesteps: int = 1000,
        prediction: str = "epsilon",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
    ):
        if schedule not in SCHEDULES:
            raise _choice_error("diffusion schedule", schedule, SCHEDULES)
        if prediction not in PREDICTIONS:
            raise _choice_error("diffusion prediction", prediction, PREDICTIONS)
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
        self.schedule = schedule
        self.num_train_timesteps = int(num_train_timesteps)
        self.prediction = prediction
        self.scheduler = None  # diffusers DDPMScheduler
        self.betas: torch.Tensor | None = None
        self.alphas_cumprod: torch.Tensor | None = None
        if prediction == "flow":
            return
        # Every value is passed explicitly: diffusers' from_config drops the ones it recorded
        # as defaults, and the samplers built from this config must see exactly these.
        # clip_sample=False: latents are not confined to [-1, 1] as pixels are.
        # timestep_spacing: only read by samplers; make_sampler says why "trailing".
        from diffusers import DDPMScheduler  # here, not at import: diffusers takes seconds to import

        self.scheduler = DDPMScheduler(
            num_train_timesteps=self.num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=SCHEDULES[schedule],
            prediction_type=prediction,
            clip_sample=False,
            variance_type="fixed_small",
            timestep_spacing="trailing",
            steps_offset=0,
            thresholding=False,
            rescale_betas_zero_snr=False,
        )
        self.betas = self.scheduler.betas.to(torch.float64).clone()
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(torch.float64).clone()

    @property
    def is_flow(self) -> bool:
        return self.prediction == "flow"

    def sample_timesteps(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        max_t: int | None = None,
    ) -> torch.Tensor:
        """``[n]`` training timesteps, uniform: int64 in ``[0, max_t]`` (default ``T-1``), or
        for flow float in ``[0, max_t / T]`` (default ``[0, 1)``).

        ``max_t`` (in integer-timestep units for every prediction) caps the noise, as
        Transfusion does for an image that precedes its caption (t <= 500 of 1000), so the
        caption is conditioned on a recognisable image. Drawn on the generator's device (a
        CPU generator cannot fill a GPU tensor) and moved to ``device``.
        """
        T = self.num_train_timesteps
        if max_t is not None and not 0 <= max_t <= T - 1:
            raise ValueError(f"max_t={max_t} is outside [0, {T - 1}] (num_train_timesteps={T})")
        draw_device = generator.device if generator is not None else device
        if self.is_flow:
            hi = 1.0 if max_t is None else max_t / T
            t = torch.rand(n, generator=generator, device=draw_device, dtype=torch.float32) * hi
        else:
            hi = T if max_t is None else max_t + 1
            t = torch.randint(0, hi, (n,), generator=generator, device=draw_device)
        return t if device is None else t.to(device)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """What the model's timestep embedding gets: float ``t`` (``t * T`` for flow), so the
        embedding sees the same scale whichever the prediction."""
        t = t.float()
        return t * self.num_train_timesteps if self.is_flow else t

    def _check(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
        if x0.shape != noise.shape:
            raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")
        if t.ndim != 1 or t.shape[0] != x0.shape[0]:
            raise ValueError(
                f"timesteps must be [n] = [{x0.shape[0]}] (one per sample of x0 {tuple(x0.shape)}), "
                f"got {tuple(t.shape)}"
            )
        if self.is_flow and not t.is_floating_point():
            raise ValueError(
                "flow timesteps are floats in [0, 1]; got integer timesteps (use sample_timesteps of a flow schedule)"
            )
        if not self.is_flow and t.is_floating_point():
            raise ValueError(
                f"{self.prediction} timesteps are integers in [0, {self.num_train_timesteps - 1}]; "
                "got floats (use sample_timesteps, not model_timesteps)"
            )

    @staticmethod
    def _compute_dtype(x: torch.Tensor) -> torch.dtype:
        # At least fp32: diffusers casts alphas_cumprod to the sample dtype, and in bf16 the
        # noise-level coefficients would be rounded to ~3 significant digits.
        return torch.promote_types(x.dtype, torch.float32)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t`` for ``x0`` and ``noise`` of any shape ``[n, ...]`` with per-sample ``t`` ``[n]``:
        ``sqrt(ab_t) x0 + sqrt(1 - ab_t) noise`` (diffusers), or ``(1 - t) x0 + t noise`` (flow).
        Returned in ``x0``'s dtype."""
        self._check(x0, noise, t)
        dtype = self._compute_dtype(x0)
        if self.is_flow:
            tt = t.to(device=x0.device, dtype=dtype).reshape(-1, *([1] * (x0.ndim - 1)))
            return ((1 - tt) * x0.to(dtype) + tt * noise.to(dtype)).to(x0.dtype)
        return self.scheduler.add_noise(x0.to(dtype), noise.to(dtype), t).to(x0.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Regression target: ``noise`` (epsilon), ``sqrt(ab_t) noise - sqrt(1 - ab_t) x0``
        (v_prediction, diffusers ``get_velocity``), ``x0`` (sample) or ``noise - x0`` (flow)."""
        self._check(x0, noise, t)
        if self.prediction == "epsilon":
            return noise
        if self.prediction == "sample":
            return x0
        if self.is_flow:
            return noise - x0
        dtype = self._compute_dtype(x0)
        return self.scheduler.get_velocity(x0.to(dtype), noise.to(dtype), t).to(x0.dtype)


def diffusion_loss_sums(
    pred: torch.Tensor, target: torch.Tensor, mask_or_weights: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Per-microbatch sums of the squared error, for averaging over the global batch.

    pred, target: the same shape, e.g. ``[n, L, D]`` (patches) or ``[n, C, H, W]`` (latents).
    mask_or_weights: None, or a bool / float tensor whose shape is a prefix of ``pred``'s
    (``[n]`` per image, ``[n, L]`` per patch, or the full shape per element).

    Returns fp32 scalars: ``diffusion`` (sum of ``w * (pred - target)^2``, differentiable),
    ``elements`` (sum of ``w`` broadcast over the remaining dims: divide by it for the
    per-element MSE, ``F.mse_loss``'s mean over the kept elements) and ``weight`` (sum of
    ``w`` as given: the number of patches for a per-patch mask; ``n`` when None). As with
    ``lm_loss_sums``, sum all three over microbatches and data-parallel ranks *before*
    dividing, and the loss does not depend on the split. Counts are fp32: exact up to 2^24.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    err = (pred.float() - target.float()).square()
    if mask_or_weights is None:
        mask_or_weights = torch.ones(pred.shape[0], device=pred.device)
    w = mask_or_weights
    if w.ndim > pred.ndim or tuple(pred.shape[: w.ndim]) != tuple(w.shape):
        raise ValueError(
            f"mask_or_weights {tuple(w.shape)} must match the leading dims of pred {tuple(pred.shape)} "
            "(e.g. [n] per image, [n, L] per patch)"
        )
    w = w.float()
    per_w = math.prod(pred.shape[w.ndim :])  # elements under each weight
    w_b = w.reshape(*w.shape, *([1] * (pred.ndim - w.ndim)))
    return {"diffusion": (err * w_b).sum(), "elements": w.sum() * per_w, "weight": w.sum()}


class FlowEulerSampler:
    """Euler integration of the flow ODE ``dx/dt = v`` from ``t = 1`` (noise) to ``t = 0``
    in ``num_inference_steps`` equal steps; ``ts`` holds the ``N + 1`` grid points."""

    init_noise_sigma = 1.0

    def __init__(self, num_inference_steps: int, num_train_timesteps: int):
        self.num_inference_steps = num_inference_steps
        self.num_train_timesteps = num_train_timesteps
        # Python floats: the loop needs no device tensors and no host syncs for them.
        self.ts = [1.0 - i / num_inference_steps for i in range(num_inference_steps + 1)]


def make_sampler(
    kind: str,
    schedule: NoiseSchedule,
    num_inference_steps: int,
    timestep_spacing: str = "trailing",
    clip_range: float | None = None,
):
    """A sampler for ``denoise``: diffusers ``DDPMScheduler`` / ``DDIMScheduler`` built by
    ``from_config`` of the training schedule (so the same betas, prediction type, no
    clipping) with ``set_timesteps(num_inference_steps)`` done; for a flow schedule,
    ``kind="euler"`` gives a ``FlowEulerSampler``.

    ``timestep_spacing`` (diffusers'): ``trailing`` (default) starts at ``t = T-1``, the
    noise level of the N(0, 1) starting sample; ``leading`` (diffusers' default, the DDIM
    paper's) starts at ``T - T/N`` and so never sees pure noise. With the cosine schedule
    ``alphas_cumprod[T-1]`` is ~2e-9, where an epsilon model's x0 estimate divides by
    ``sqrt(2e-9)``: its errors at that first step are amplified thousands of times (a
    perfect model is still exact, see the tests). v_prediction and flow have no such
    problem; for an epsilon model that misbehaves there, try ``leading`` or more steps.
    ``clip_range``: clip each x0 estimate to ``[-clip_range, clip_range]`` (diffusers'
    ``clip_sample``): right for latents with a known range (pixels in [-1, 1]), wrong for VAE
    latents (None: no clipping). It also tames that first-step amplification.
    """
    if not 1 <= num_inference_steps <= schedule.num_train_timesteps:
        raise ValueError(f"num_inference_steps={num_inference_steps} must be in [1, {schedule.num_train_timesteps}]")
    if schedule.is_flow:
        if kind not in FLOW_SAMPLERS:
            raise _choice_error("sampler for a flow schedule", kind, FLOW_SAMPLERS)
        return FlowEulerSampler(num_inference_steps, schedule.num_train_timesteps)
    if kind not in SAMPLERS:
        raise _choice_error(f"sampler for a {schedule.prediction} schedule", kind, SAMPLERS)
    if timestep_spacing not in TIMESTEP_SPACINGS:
        raise _choice_error("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
    clip = {"clip_sample": True, "clip_sample_range": float(clip_range)} if clip_range else {}
    import diffusers

    sampler = getattr(diffusers, SAMPLERS[kind]).from_config(
        schedule.scheduler.config, timestep_spacing=timestep_spacing, **clip
    )
    sampler.set_timesteps(num_inference_steps)
    return sampler


ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def denoise(
    model_fn: ModelFn,
    shape: tuple[int, ...],
    sampler,
    generator: torch.Generator | None = None,
    guidance_scale: float = 1.0,
    uncond_fn: ModelFn | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Sample ``shape = [n, ...]`` from noise with ``sampler`` (from ``make_sampler``).

    ``model_fn(x_t, t)`` returns the prediction the schedule was trained for; ``t`` is a
    float ``[n]`` tensor on ``device`` with the values ``NoiseSchedule.model_timesteps``
    gives in training. With ``guidance_scale != 1``, ``uncond_fn`` (same signature, e.g.
    the model with the caption dropped) is called too and the prediction is
    ``uncond + guidance_scale * (cond - uncond)``; at 1 it is not called at all, so the
    result is exactly the unguided one. ``device`` defaults to the generator's (CPU without
    one); the starting noise is drawn from ``generator``.
    """
    if guidance_scale != 1.0 and uncond_fn is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs uncond_fn (the unconditional prediction)")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    n = shape[0]

    def predict(x: torch.Tensor, t_model: float) -> torch.Tensor:
        t = torch.full((n,), t_model, device=device, dtype=torch.float32)
        cond = model_fn(x, t)
        if guidance_scale == 1.0:
            return cond
        uncond = uncond_fn(x, t)
        return uncond + guidance_scale * (cond - uncond)

    from diffusers.utils.torch_utils import randn_tensor

    x = randn_tensor(tuple(shape), generator=generator, device=device, dtype=dtype) * sampler.init_noise_sigma
    if isinstance(sampler, FlowEulerSampler):
        T = sampler.num_train_timesteps
        for t, t_next in zip(sampler.ts[:-1], sampler.ts[1:]):
            x = x + (t_next - t) * predict(x, t * T)
        return x
    for t in sampler.timesteps:
        pred = predict(sampler.scale_model_input(x, t), float(t))
        x = sampler.step(pred, t, x, generator=generator).prev_sample
    return x

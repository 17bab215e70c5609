"""Diffusion objective: schedules against diffusers and a float64 closed form, noising and
targets, timestep sampling, loss sums, and sampling with oracle models and guidance."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from megafusion.objectives.diffusion import (
    FlowEulerSampler,
    NoiseSchedule,
    denoise,
    diffusion_loss_sums,
    make_sampler,
)

DIFFUSERS_NAME = {"cosine": "squaredcos_cap_v2", "linear": "linear"}
SHAPES = [(5, 4, 8, 8), (3, 7, 16), (6, 9)]


def cosine_reference(T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nichol & Dhariwal's cosine schedule in float64: betas clipped at 0.999, then cumprod."""

    def alpha_bar(t):
        return math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = torch.tensor([min(1 - alpha_bar(i + 1) / alpha_bar(i), 0.999) for i in range(T)], dtype=torch.float64)
    return betas, torch.cumprod(1 - betas, dim=0)


def broadcast(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.reshape(-1, *([1] * (ndim - 1)))


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("T", [1000, 100])
def test_schedule_matches_diffusers(schedule, T):
    ns = NoiseSchedule(schedule, num_train_timesteps=T)
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_NAME[schedule])
    assert ns.alphas_cumprod.dtype == torch.float64 and ns.alphas_cumprod.shape == (T,)
    torch.testing.assert_close(ns.alphas_cumprod, ref.alphas_cumprod.double(), rtol=0, atol=1e-6)
    torch.testing.assert_close(ns.betas, ref.betas.double(), rtol=0, atol=1e-6)
    if schedule == "cosine":
        betas, ab = cosine_reference(T)
        torch.testing.assert_close(ns.betas, betas, rtol=0, atol=1e-6)
        torch.testing.assert_close(ns.alphas_cumprod, ab, rtol=0, atol=1e-6)
    else:  # DDPM's linear betas
        torch.testing.assert_close(ns.betas, torch.linspace(1e-4, 0.02, T, dtype=torch.float64), rtol=0, atol=1e-6)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("shape", SHAPES)
def test_add_noise_and_targets(schedule, shape):
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    eps = NoiseSchedule(schedule)
    t = eps.sample_timesteps(shape[0], gen)
    assert t.dtype == torch.int64
    ref = DDPMScheduler(beta_schedule=DIFFUSERS_NAME[schedule])
    xt = eps.add_noise(x0, noise, t)
    torch.testing.assert_close(xt, ref.add_noise(x0, noise, t), rtol=0, atol=1e-6)
    ab = broadcast(eps.alphas_cumprod[t], len(shape))
    closed = ab.sqrt() * x0.double() + (1 - ab).sqrt() * noise.double()
    torch.testing.assert_close(xt.double(), closed, rtol=0, atol=1e-6)
    assert torch.equal(eps.target(x0, noise, t), noise)

    v = NoiseSchedule(schedule, prediction="v_prediction")
    torch.testing.assert_close(v.target(x0, noise, t), ref.get_velocity(x0, noise, t), rtol=0, atol=1e-6)
    closed_v = ab.sqrt() * noise.double() - (1 - ab).sqrt() * x0.double()
    torch.testing.assert_close(v.target(x0, noise, t).double(), closed_v, rtol=0, atol=1e-6)
    torch.testing.assert_close(v.add_noise(x0, noise, t), xt, rtol=0, atol=0)
    assert torch.equal(NoiseSchedule(schedule, prediction="sample").target(x0, noise, t), x0)


def test_add_noise_keeps_dtype_and_computes_in_fp32():
    ns = NoiseSchedule("cosine")
    x0, noise = torch.randn(4, 8), torch.randn(4, 8)
    t = torch.tensor([0, 10, 500, 999])
    out = ns.add_noise(x0.bfloat16(), noise.bfloat16(), t)
    assert out.dtype == torch.bfloat16
    exact = ns.add_noise(x0.bfloat16().float(), noise.bfloat16().float(), t)
    torch.testing.assert_close(out, exact.bfloat16(), rtol=0, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_flow_noising_and_target(shape):
    gen = torch.Generator().manual_seed(1)
    ns = NoiseSchedule(prediction="flow", num_train_timesteps=1000)
    assert ns.scheduler is None and ns.alphas_cumprod is None
    x0, noise = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    t = ns.sample_timesteps(shape[0], gen)
    assert t.is_floating_point() and (t >= 0).all() and (t < 1).all()
    tb = broadcast(t, len(shape))
    torch.testing.assert_close(ns.add_noise(x0, noise, t), (1 - tb) * x0 + tb * noise, rtol=0, atol=1e-6)
    torch.testing.assert_close(ns.target(x0, noise, t), noise - x0, rtol=0, atol=0)
    torch.testing.assert_close(ns.model_timesteps(t), t * 1000)
    # t = 0 is the data, t = 1 the noise
    ends = (torch.arange(shape[0]) % 2).float()
    out = ns.add_noise(x0, noise, ends)
    torch.testing.assert_close(out[0::2], x0[0::2], rtol=0, atol=0)
    torch.testing.assert_close(out[1::2], noise[1::2], rtol=0, atol=0)


def test_timestep_kind_and_shape_errors():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="integers"):
        NoiseSchedule().add_noise(x, x, torch.rand(3))
    with pytest.raises(ValueError, match="floats in"):
        NoiseSchedule(prediction="flow").add_noise(x, x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"\[n\] = \[3\]"):
        NoiseSchedule().target(x, x, torch.tensor([1, 2]))


def test_max_t_caps_noise():
    gen = torch.Generator().manual_seed(2)
    ns = NoiseSchedule()
    t = ns.sample_timesteps(20_000, gen, max_t=500)
    assert t.min() == 0 and t.max() == 500
    full = ns.sample_timesteps(20_000, gen)
    assert full.min() == 0 and full.max() == 999
    flow = NoiseSchedule(prediction="flow").sample_timesteps(20_000, gen, max_t=500)
    assert flow.max() <= 0.5 and flow.max() > 0.49
    for bad in (-1, 1000):
        with pytest.raises(ValueError, match="max_t"):
            ns.sample_timesteps(4, gen, max_t=bad)


def test_unknown_names_list_choices():
    with pytest.raises(ValueError, match="'cosine', 'linear'"):
        NoiseSchedule("sigmoid")
    with pytest.raises(ValueError, match="'epsilon', 'v_prediction', 'sample', 'flow'"):
        NoiseSchedule(prediction="x0")
    with pytest.raises(ValueError, match="'ddpm', 'ddim'"):
        make_sampler("euler", NoiseSchedule(), 10)
    with pytest.raises(ValueError, match="'euler'"):
        make_sampler("ddim", NoiseSchedule(prediction="flow"), 10)


def test_loss_sums_with_mask():
    gen = torch.Generator().manual_seed(3)
    pred = torch.randn(4, 6, 5, generator=gen, requires_grad=True)
    target = torch.randn(4, 6, 5, generator=gen)
    mask = torch.rand(4, 6, generator=gen) < 0.5
    out = diffusion_loss_sums(pred, target, mask)
    sq = (pred - target).square()
    torch.testing.assert_close(out["diffusion"], sq[mask].sum())
    assert out["elements"].item() == mask.sum().item() * 5 and out["weight"].item() == mask.sum().item()
    mse = torch.nn.functional.mse_loss(pred[mask], target[mask])
    torch.testing.assert_close(out["diffusion"] / out["elements"], mse)
    out["diffusion"].backward()
    assert torch.equal(pred.grad != 0, mask.unsqueeze(-1).expand_as(pred))
    # summed over "microbatches" before dividing: the same mean as the whole batch
    parts = [diffusion_loss_sums(pred[i : i + 2], target[i : i + 2], mask[i : i + 2]) for i in (0, 2)]
    torch.testing.assert_close(
        sum(p["diffusion"] for p in parts) / sum(p["elements"] for p in parts), out["diffusion"] / out["elements"]
    )
    # no mask: plain sum / numel; float weights per image
    plain = diffusion_loss_sums(pred, target)
    assert plain["elements"].item() == pred.numel() and plain["weight"].item() == 4
    w = torch.tensor([1.0, 0.5, 0.0, 2.0])
    weighted = diffusion_loss_sums(pred, target, w)
    torch.testing.assert_close(weighted["diffusion"], (sq.sum(dim=(1, 2)) * w).sum())
    torch.testing.assert_close(weighted["elements"], w.sum() * 30)
    with pytest.raises(ValueError, match="leading dims"):
        diffusion_loss_sums(pred, target, mask.T)


def oracle(ns: NoiseSchedule, x0: torch.Tensor):
    """The exact prediction for a known x0, from x_t and t as denoise passes them."""
    T = ns.num_train_timesteps

    def fn(xt, t_model):
        if ns.is_flow:
            t = broadcast(t_model / T, xt.ndim)
            noise = (xt - (1 - t) * x0) / t
            return noise - x0
        ab = broadcast(ns.alphas_cumprod.to(xt.device)[t_model.long()], xt.ndim).to(xt.dtype)
        noise = (xt - ab.sqrt() * x0) / (1 - ab).sqrt()
        if ns.prediction == "sample":
            return x0.expand_as(xt)
        return noise if ns.prediction == "epsilon" else ab.sqrt() * noise - (1 - ab).sqrt() * x0

    return fn


@pytest.mark.parametrize(
    "schedule,prediction,kind,spacing",
    [
        ("cosine", "epsilon", "ddim", "trailing"),
        ("linear", "epsilon", "ddim", "trailing"),
        ("cosine", "v_prediction", "ddim", "trailing"),
        ("cosine", "epsilon", "ddpm", "trailing"),
        ("cosine", "epsilon", "ddim", "leading"),
        ("cosine", "flow", "euler", "trailing"),
        ("cosine", "sample", "ddim", "trailing"),
        ("linear", "sample", "ddpm", "trailing"),
    ],
)
def test_denoise_with_oracle_recovers_x0(schedule, prediction, kind, spacing):
    ns = NoiseSchedule(schedule, prediction=prediction)
    x0 = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(4)) * 1.5  # beyond [-1, 1]: no clipping
    sampler = make_sampler(kind, ns, num_inference_steps=5, timestep_spacing=spacing)
    out = denoise(oracle(ns, x0), x0.shape, sampler, torch.Generator().manual_seed(5))
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-4)


def test_make_sampler_uses_training_schedule():
    ns = NoiseSchedule("cosine", prediction="v_prediction")
    for kind, cls in (("ddpm", DDPMScheduler), ("ddim", DDIMScheduler)):
        s = make_sampler(kind, ns, 10)
        assert type(s) is cls and s.config.prediction_type == "v_prediction" and not s.config.clip_sample
        torch.testing.assert_close(s.alphas_cumprod.double(), ns.alphas_cumprod, rtol=0, atol=0)
        assert s.timesteps[0] == 999 and len(s.timesteps) == 10  # starts from pure noise
    flow = make_sampler("euler", NoiseSchedule(prediction="flow"), 4)
    assert isinstance(flow, FlowEulerSampler) and flow.ts == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert make_sampler("ddim", ns, 10, timestep_spacing="leading").timesteps[0] == 900
    with pytest.raises(ValueError, match="num_inference_steps"):
        make_sampler("ddim", ns, 0)
    with pytest.raises(ValueError, match="'trailing', 'leading', 'linspace'"):
        make_sampler("ddim", ns, 10, timestep_spacing="uniform")


@pytest.mark.parametrize("kind,prediction", [("ddim", "epsilon"), ("ddpm", "epsilon"), ("euler", "flow")])
def test_guidance(kind, prediction):
    ns = NoiseSchedule(prediction=prediction)
    shape = (2, 3, 4)
    c = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    u = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    calls = {"uncond": 0}

    def cond_fn(x, t):
        assert t.shape == (2,) and t.dtype == torch.float32
        return c + 0.1 * x

    def uncond_fn(x, t):
        calls["uncond"] += 1
        return u + 0.1 * x

    def run(fn, **kw):
        return denoise(fn, shape, make_sampler(kind, ns, 4), torch.Generator().manual_seed(8), **kw)

    plain = run(cond_fn)
    assert torch.equal(run(cond_fn, guidance_scale=1.0, uncond_fn=uncond_fn), plain)
    assert calls["uncond"] == 0
    s = 3.0
    guided = run(cond_fn, guidance_scale=s, uncond_fn=uncond_fn)
    combined = run(lambda x, t: uncond_fn(x, t) + s * (cond_fn(x, t) - uncond_fn(x, t)))
    torch.testing.assert_close(guided, combined, rtol=0, atol=1e-6)
    assert not torch.allclose(guided, plain)
    with pytest.raises(ValueError, match="uncond_fn"):
        run(cond_fn, guidance_scale=2.0)


def test_clip_range_clips_x0_estimates_only_when_asked():
    from megafusion.objectives.diffusion import NoiseSchedule, make_sampler

    schedule = NoiseSchedule("cosine", 1000)
    assert not make_sampler("ddim", schedule, 5).config.clip_sample
    clipped = make_sampler("ddim", schedule, 5, clip_range=1.0)
    assert clipped.config.clip_sample and clipped.config.clip_sample_range == 1.0
    x = torch.full((1, 3, 2, 2), 0.5)
    wild = torch.full_like(x, 50.0)  # an absurd noise prediction
    t = clipped.timesteps[0]
    assert clipped.step(wild, t, x).pred_original_sample.abs().max() <= 1.0
    assert make_sampler("ddim", schedule, 5).step(wild, t, x).pred_original_sample.abs().max() > 1.0

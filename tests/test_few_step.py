"""The few-step samplers (`euler`, `dmd`) in the shared denoising loop, checked against hand-computed steps."""

import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler

from pipeline import demo
from pipeline.sampler import DenoiseRequest, denoise, latent_shape
from conftest import count_forward_calls

CPU = torch.device("cpu")
SHAPE = latent_shape(frame_num=5, height=32, width=32)


class KnownFlowDiT:
    """A stand-in DiT whose flow prediction is known: v = slope * x + t/1000 + mean(context).

    It records the timesteps it is given; a context of ones (prompt) against zeros (negative prompt)
    makes the guided prediction slope * x + t/1000 + guide_scale.
    """

    dtype = torch.float32
    config = SimpleNamespace(in_channels=SHAPE[1])
    blocks = [SimpleNamespace(attn1=SimpleNamespace(processor=None))]

    def __init__(self, slope: float = 0.5):
        self.slope = slope
        self.timesteps: list[int] = []

    def cache_context(self, branch):
        return contextlib.nullcontext()

    def __call__(self, hidden_states, timestep, encoder_hidden_states, return_dict):
        if encoder_hidden_states.mean() == 1:  # the conditional pass: one record per step
            self.timesteps.append(int(timestep))
        flow = self.slope * hidden_states + timestep.float() / 1000 + encoder_hidden_states.mean()
        return (flow,)


def request(sampler, steps, guide_scale=1.0, seed=0, shift=5.0, timesteps=None):
    return DenoiseRequest(
        context=torch.ones(1, 8, demo.TEXT_DIM),
        negative_context=torch.zeros(1, 8, demo.TEXT_DIM),
        frame_num=5,
        height=32,
        width=32,
        steps=steps,
        shift=shift,
        guide_scale=guide_scale,
        seed=seed,
        sampler=sampler,
        timesteps=timesteps,
    )


def seeded_draws(seed, count):
    """The initial latents, then the renoise draws, from one generator seeded with the request's seed."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=generator).double().numpy() for _ in range(count)]


def official_sigmas(steps, shift):
    sigmas = np.array([0.999 * (1 - i / steps) for i in range(steps)])
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def fastvideo_sigma(timestep):
    """The sigma of the shift-8 grid point 8k/(1000+7k), k = 1..1000, nearest to timestep/1000."""
    k = np.arange(1, 1001)
    grid = 8 * k / (1000 + 7 * k)
    return grid[np.argmin(np.abs(grid * 1000 - timestep))]


def test_fastwan_timesteps_sit_on_the_shift_8_grid():
    assert fastvideo_sigma(1000) == 1.0
    assert fastvideo_sigma(757) == pytest.approx(28 / 37, abs=1e-15)  # k = 280
    assert fastvideo_sigma(522) == pytest.approx(12 / 23, abs=1e-15)  # k = 120


@pytest.mark.parametrize("guide_scale", [1.0, 3.0])
@pytest.mark.parametrize("shift", [5.0, 8.0])
def test_euler_steps_the_official_sigmas(guide_scale, shift):
    dit = KnownFlowDiT()
    latents = denoise(dit, request("euler", steps=4, guide_scale=guide_scale, shift=shift), CPU)

    sigmas = np.append(official_sigmas(4, shift), 0.0)
    timesteps = [int(sigma * 1000) for sigma in sigmas[:-1]]
    assert dit.timesteps == timesteps
    (x,) = seeded_draws(0, 1)
    for i, t in enumerate(timesteps):
        flow = 0.5 * x + t / 1000 + max(guide_scale, 1.0)  # guidance is off at 1: the conditional pass alone
        x = x + (sigmas[i + 1] - sigmas[i]) * flow
    np.testing.assert_allclose(latents.numpy(), x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("timesteps", [None, [1000, 750, 500, 250]])
@pytest.mark.parametrize("guide_scale", [1.0, 3.0])
def test_dmd_predicts_x0_then_renoises_to_the_next_timestep(timesteps, guide_scale):
    expected_timesteps = timesteps or [1000, 757, 522]  # FastWan2.1-T2V-1.3B's by default
    dit = KnownFlowDiT()
    latents = denoise(dit, request("dmd", len(expected_timesteps), guide_scale, timesteps=timesteps), CPU)

    assert dit.timesteps == expected_timesteps
    x, *renoise = seeded_draws(0, len(expected_timesteps))
    sigmas = [fastvideo_sigma(t) for t in expected_timesteps]
    for i, t in enumerate(expected_timesteps):
        x0 = x - sigmas[i] * (0.5 * x + t / 1000 + max(guide_scale, 1.0))
        x = x0 if i == len(sigmas) - 1 else (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * renoise[i]
    np.testing.assert_allclose(latents.numpy(), x, rtol=0, atol=1e-5)


def test_dmd_renoise_is_seeded_by_the_request_alone():
    """With v = x_t + 1, step 1 (sigma 1) predicts x0 = -1 whatever the initial noise: what follows
    comes from the renoise draws. The global RNG state must not reach them."""
    def run(seed, global_seed):
        torch.manual_seed(global_seed)
        return denoise(KnownFlowDiT(slope=1.0), request("dmd", 3, seed=seed), CPU)

    first = run(seed=11, global_seed=0)
    np.testing.assert_array_equal(run(seed=11, global_seed=1).numpy(), first.numpy())
    assert not torch.allclose(run(seed=12, global_seed=0), first, atol=1e-3)


def test_unipc_in_the_shared_loop_is_a_plain_diffusers_unipc_loop():
    """The default sampler is unchanged: the same as stepping diffusers' UniPC by hand on the same noise."""
    latents = denoise(KnownFlowDiT(), request("unipc", steps=5, guide_scale=3.0, shift=8.0), CPU)

    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0, solver_order=2,
        predict_x0=True, solver_type="bh2", lower_order_final=True, final_sigmas_type="zero",
    )
    scheduler.set_timesteps(sigmas=official_sigmas(5, 8.0), device=CPU)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for t in scheduler.timesteps:
        x = scheduler.step(0.5 * x + t / 1000 + 3.0, t, x, return_dict=False)[0]
    torch.testing.assert_close(latents, x, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def demo_dit():
    """The tiny demo DiT (random weights): real forwards to count."""
    return demo.build_transformer()


@pytest.fixture
def dit_calls(demo_dit):
    yield from count_forward_calls(demo_dit)


@pytest.mark.parametrize(("sampler", "steps"), [("euler", 4), ("dmd", 3)])
@pytest.mark.parametrize(("guide_scale", "passes_per_step"), [(1.0, 1), (5.0, 2)])
def test_one_dit_forward_per_step_and_pass(demo_dit, dit_calls, sampler, steps, guide_scale, passes_per_step):
    progress = []
    latents = denoise(demo_dit, request(sampler, steps, guide_scale), CPU, on_progress=lambda *event: progress.append(event))
    assert latents.shape == SHAPE
    assert torch.isfinite(latents).all()
    assert len(dit_calls) == steps * passes_per_step
    assert progress == [("denoise", step, steps) for step in range(1, steps + 1)]


@pytest.mark.parametrize(
    ("sampler", "steps", "timesteps", "error"),
    [
        ("lcm", 4, None, "sampler must be one of unipc, euler, dmd"),
        ("unipc", 4, [1000, 500, 250, 100], "timesteps are for the dmd sampler"),
        ("dmd", 4, None, r"3 timesteps \[1000, 757, 522\], but steps=4"),
        ("dmd", 3, [1000, 522, 757], "must decrease"),
        ("dmd", 2, [1001, 500], "must decrease within 1..1000"),
        ("dmd", 2, [500, 0], "must decrease within 1..1000"),
    ],
)
def test_a_setting_the_sampler_would_ignore_is_refused(sampler, steps, timesteps, error):
    dit = KnownFlowDiT()
    with pytest.raises(ValueError, match=error):
        denoise(dit, request(sampler, steps, timesteps=timesteps), CPU)
    assert dit.timesteps == []


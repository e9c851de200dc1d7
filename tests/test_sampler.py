import contextlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from pipeline import demo
from pipeline.generator import VideoModel
from pipeline.params import GenerationParams
from pipeline.sampler import DenoiseRequest, GenerationCancelled, denoise, flow_sigmas, make_scheduler
from conftest import count_forward_calls

CPU = torch.device("cpu")
SCHEDULES = [(1, 1.0), (4, 8.0), (10, 3.0), (37, 5.0), (50, 8.0), (100, 20.0)]


def official_sigmas(steps, shift):
    """Wan2.1's FlowUniPCMultistepScheduler: sigmas from 0.999 to 0 in `steps` equal strides, then shifted."""
    sigmas = np.array([0.999 * (1 - i / steps) for i in range(steps)])
    return shift * sigmas / (1 + (shift - 1) * sigmas)


@pytest.mark.parametrize(("steps", "shift"), SCHEDULES)
def test_flow_sigmas_follow_the_official_formula(steps, shift):
    np.testing.assert_allclose(flow_sigmas(steps, shift), official_sigmas(steps, shift), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("steps", "shift"), SCHEDULES)
def test_scheduler_runs_the_official_sigmas_and_timesteps(steps, shift):
    scheduler = make_scheduler(steps, shift, CPU)
    expected = official_sigmas(steps, shift)
    np.testing.assert_allclose(scheduler.sigmas[:-1].numpy(), expected, rtol=0, atol=1e-6)
    assert scheduler.sigmas[-1] == 0
    assert scheduler.timesteps.tolist() == [int(sigma * 1000) for sigma in expected]


def test_schedulers_with_different_shifts_share_no_state():
    shifts = [3.0, 8.0] * 4
    with ThreadPoolExecutor(len(shifts)) as pool:
        schedulers = list(pool.map(lambda shift: make_scheduler(10, shift, CPU), shifts))
    for shift, scheduler in zip(shifts, schedulers):
        np.testing.assert_allclose(scheduler.sigmas[:-1].numpy(), official_sigmas(10, shift), rtol=0, atol=1e-6)
    stepped, other = schedulers[:2]
    stepped.set_begin_index(0)
    sample = torch.randn(1, 16, 1, 2, 2)
    stepped.step(torch.zeros_like(sample), stepped.timesteps[0], sample)
    assert stepped.step_index == 1
    assert other.step_index is None


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    return demo.build_transformer()


@pytest.fixture
def dit_calls(transformer):
    """One entry per DiT forward pass during a test."""
    yield from count_forward_calls(transformer)


def small_request(steps, guide_scale):
    context = torch.randn(2, 512, demo.TEXT_DIM, generator=torch.Generator().manual_seed(0))
    return DenoiseRequest(
        context=context[:1],
        negative_context=context[1:],
        frame_num=5,
        height=32,
        width=32,
        steps=steps,
        shift=8.0,
        guide_scale=guide_scale,
        seed=0,
    )


@pytest.mark.parametrize(("guide_scale", "passes_per_step"), [(0.0, 1), (1.0, 1), (1.5, 2), (6.0, 2)])
def test_unconditional_pass_only_when_guidance_scale_above_one(transformer, dit_calls, guide_scale, passes_per_step):
    latents = denoise(transformer, small_request(steps=3, guide_scale=guide_scale), CPU)
    assert latents.shape == (1, 16, 2, 4, 4)
    assert len(dit_calls) == 3 * passes_per_step


def test_cancel_stops_within_one_step(transformer, dit_calls):
    done = []
    with pytest.raises(GenerationCancelled):
        denoise(
            transformer,
            small_request(steps=6, guide_scale=6.0),
            CPU,
            on_progress=lambda phase, step, total: done.append(step),
            should_cancel=lambda: len(done) >= 2,
        )
    assert done == [1, 2]
    assert len(dit_calls) == 2 * 2  # two steps, conditional + unconditional each


def test_cancel_between_a_steps_two_passes_skips_the_conditional_pass(transformer, dit_calls):
    """A cancel that arrives during the unconditional pass stops before the conditional one: the GPU
    is given back within half a step."""
    with pytest.raises(GenerationCancelled, match="during step 2 of 6"):
        denoise(transformer, small_request(steps=6, guide_scale=6.0), CPU, should_cancel=lambda: len(dit_calls) >= 3)
    assert len(dit_calls) == 3  # step 1's two passes, step 2's unconditional pass

@pytest.fixture(scope="module")
def video_model(demo_source):
    return VideoModel.load(demo_source, CPU)


def generate(video_model, seed, **callbacks):
    """A 5-frame 832*480 demo video from fixed random text embeddings."""
    embeds = torch.randn(15, demo.TEXT_DIM, generator=torch.Generator().manual_seed(0))
    params = GenerationParams(prompt="a red fox in snow", frame_num=5, sample_steps=3, seed=seed)
    return video_model.generate(params, embeds[:6], embeds[6:], **callbacks)


@pytest.fixture(scope="module")
def seed7_run(video_model):
    """One generation with seed 7 and the progress events it reported."""
    events = []
    result = generate(video_model, 7, on_progress=lambda *event: events.append(event))
    return result, events


def test_same_seed_same_frames_other_seed_other_frames(video_model, seed7_run):
    first, _ = seed7_run
    assert first.frames.shape == (5, 480, 832, 3)
    assert first.seed == 7
    np.testing.assert_array_equal(generate(video_model, 7).frames, first.frames)
    assert not np.array_equal(generate(video_model, 8).frames, first.frames)


def test_progress_reports_every_denoise_step_then_decode(seed7_run):
    _, events = seed7_run
    assert events == [("denoise", 1, 3), ("denoise", 2, 3), ("denoise", 3, 3), ("decode", 0, 1), ("decode", 1, 1)]


def test_cancelled_generation_never_decodes(video_model, monkeypatch):
    decode = video_model.models.vae.decode
    decodes = []
    monkeypatch.setattr(video_model.models.vae, "decode", lambda *a, **k: decodes.append(1) or decode(*a, **k))
    events = []
    with pytest.raises(GenerationCancelled):
        generate(video_model, 7, on_progress=lambda *event: events.append(event), should_cancel=lambda: bool(events))
    assert events == [("denoise", 1, 3)]
    assert decodes == []


def test_a_cancel_during_the_last_step_skips_the_decode(video_model, monkeypatch):
    """The last step is followed by no step check: the decode (seconds, minutes on a CPU) must check too."""
    decode = video_model.models.vae.decode
    decodes = []
    monkeypatch.setattr(video_model.models.vae, "decode", lambda *a, **k: decodes.append(1) or decode(*a, **k))
    events = []
    with pytest.raises(GenerationCancelled, match="before the decode"):
        generate(video_model, 7, on_progress=lambda *event: events.append(event), should_cancel=lambda: ("denoise", 3, 3) in events)
    assert events[-1] == ("denoise", 3, 3)
    assert decodes == []


def test_a_pending_prompt_is_awaited_only_after_step_ones_unconditional_pass(video_model, seed7_run):
    """The prompt may still be encoding when the generation starts: the unconditional pass of step 1
    runs first, then the call that waits for the prompt, and the frames are the same as with the
    embeddings given up front."""
    embeds = torch.randn(15, demo.TEXT_DIM, generator=torch.Generator().manual_seed(0))
    forwards_before_wait = []
    with contextlib.closing(count_forward_calls(video_model.models.transformer)) as counting:
        dit_calls = next(counting)

        def pending_prompt() -> torch.Tensor:
            forwards_before_wait.append(len(dit_calls))
            return embeds[:6]

        params = GenerationParams(prompt="a red fox in snow", frame_num=5, sample_steps=3, seed=7)
        result = video_model.generate(params, pending_prompt, embeds[6:])
    assert forwards_before_wait == [1]  # called once, after exactly one (unconditional) forward
    assert "prompt_wait" in result.timings
    np.testing.assert_array_equal(result.frames, seed7_run[0].frames)


def test_a_bad_pending_prompt_fails_the_generation_with_its_shape(video_model):
    params = GenerationParams(prompt="a red fox in snow", frame_num=5, sample_steps=2, seed=7)
    with pytest.raises(ValueError, match=r"context must be \[n_tokens, \d+\], got \[6, 3\]"):
        video_model.generate(params, lambda: torch.zeros(6, 3), torch.zeros(9, demo.TEXT_DIM))

"""The Wan2.1 denoising loop: the official flow-matching UniPC, or a few-step sampler for distilled DiTs.

Read top to bottom it is the whole denoising loop, in the spirit of diffusers' `pipeline_wan.py`:
seeded float32 noise -> per step, the unconditional (unless g <= 1) and the conditional DiT pass ->
guidance -> one sampler step. Nothing here knows about Ray or HTTP.

The sampler (`DenoiseRequest.sampler`, one of `SAMPLERS`) only decides the timesteps and how the
next latents follow from the guided flow prediction; guidance, cancellation, progress and
CFG-parallel are the same for all of them:
- `unipc`: the official schedule (default), solver order 2 on the shifted sigmas.
- `euler`: plain flow-matching Euler on the same sigmas, for step-distilled LoRAs (CausVid, lightx2v).
- `dmd`: predict x0, then renoise it to the next timestep, as DMD-distilled checkpoints sample (FastWan).

The unconditional pass goes first because it needs only the negative prompt, which is nearly always
cached: the prompt's embeddings may arrive as a call that waits for them (`DenoiseRequest.context`),
and step 1's unconditional pass runs while the prompt is still being encoded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from diffusers import UniPCMultistepScheduler

from pipeline.dit import guidance_step
from pipeline.params import DMD_TIMESTEPS, SAMPLERS

NUM_TRAIN_TIMESTEPS = 1000
SIGMA_MAX = 0.999  # the official scheduler's first sigma: 1 - 1/num_train_timesteps
VAE_STRIDE = (4, 8, 8)  # time, height, width

ProgressCallback = Callable[[str, int, int], None]  # (phase, step, total)
CancelCheck = Callable[[], bool]


class GenerationCancelled(Exception):
    """Raised between steps, or between a step's two passes, when the caller asked to stop; no VAE decode follows."""


def flow_sigmas(steps: int, shift: float) -> np.ndarray:
    """Official schedule: linspace(0.999, 0, steps+1)[:-1], then sigma' = shift*s / (1 + (shift-1)*s)."""
    sigmas = np.linspace(SIGMA_MAX, 0.0, steps + 1)[:-1]
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def make_scheduler(steps: int, shift: float, device: torch.device) -> UniPCMultistepScheduler:
    """A fresh scheduler per call: concurrent requests with different shifts share no state."""
    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=1.0,  # the sigmas below are already shifted
        solver_order=2,
        predict_x0=True,
        solver_type="bh2",
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    scheduler.set_timesteps(sigmas=flow_sigmas(steps, shift), device=device)
    return scheduler


def latent_shape(frame_num: int, height: int, width: int, channels: int = 16) -> tuple[int, ...]:
    t, h, w = VAE_STRIDE
    return (1, channels, (frame_num - 1) // t + 1, height // h, width // w)


def draw_noise(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """float32 noise from a generator seeded on the target device, as the official code draws it."""
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)


# FastVideo's DmdDenoisingStage builds its own FlowMatchEulerDiscreteScheduler(shift=8.0), whatever the
# pipeline's flow_shift, and maps a timestep t to the sigma of that table's entry nearest to t: about
# t/1000, snapped to the shift-8 grid (757 -> 28/37 = 0.75676). So `dmd` does not use the request's shift.
DMD_GRID_SHIFT = 8.0


def dmd_sigma(timestep: int) -> float:
    """The sigma FastVideo pairs with a DMD timestep (fastvideo/models/utils.py `pred_noise_to_pred_video`
    and FlowMatchEulerDiscreteScheduler.add_noise: argmin over the scheduler's 1000-entry table)."""
    unshifted = torch.from_numpy(np.linspace(1, NUM_TRAIN_TIMESTEPS, NUM_TRAIN_TIMESTEPS, dtype=np.float32)[::-1].copy())
    unshifted = unshifted / NUM_TRAIN_TIMESTEPS
    grid_sigmas = DMD_GRID_SHIFT * unshifted / (1 + (DMD_GRID_SHIFT - 1) * unshifted)
    grid_timesteps = grid_sigmas * NUM_TRAIN_TIMESTEPS  # float32, as the scheduler stores them
    return float(grid_sigmas[torch.argmin((grid_timesteps.double() - timestep).abs())])


# (step index, guided flow prediction, latents) -> the next latents
SamplerStep = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Schedule:
    """What a sampler decides: the timesteps, and the next latents from each step's guided prediction."""

    timesteps: torch.Tensor  # int64, one per step: what the DiT is told
    step: SamplerStep


def unipc_schedule(steps: int, shift: float, device: torch.device) -> Schedule:
    """The official sampler; its scheduler keeps the multistep history, so one per request."""
    scheduler = make_scheduler(steps, shift, device)
    scheduler.set_begin_index(0)

    def step(i: int, flow: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        return scheduler.step(flow, scheduler.timesteps[i], latents, return_dict=False)[0]

    return Schedule(scheduler.timesteps, step)


def euler_schedule(steps: int, shift: float, device: torch.device) -> Schedule:
    """x_next = x + (sigma_next - sigma) * v on the official sigmas, as FlowMatchEulerDiscreteScheduler steps.

    Not diffusers' Euler sigmas (linspace(1, ~0, steps), then shifted): at 4 steps and shift 5 they are
    1, 0.91, 0.72, 0.02, the last of 4 steps spent at almost no noise. The official ones match lightx2v's step-distill
    schedule (lightx2v/models/schedulers/wan/step_distill/scheduler.py: shift(t/1000) for t in 1000, 750,
    500, 250) up to its first sigma, 1 instead of 0.999.
    """
    sigmas = np.append(flow_sigmas(steps, shift), 0.0)
    # Truncated to int64 as UniPC feeds them: a DiT compiled (and warmed) with unipc meets no new dtype.
    timesteps = torch.from_numpy((sigmas[:-1] * NUM_TRAIN_TIMESTEPS).astype(np.int64)).to(device)
    return Schedule(timesteps, lambda i, flow, latents: latents + float(sigmas[i + 1] - sigmas[i]) * flow)


def dmd_schedule(timesteps: list[int], device: torch.device, generator: torch.Generator) -> Schedule:
    """Denoise to x0, then renoise to the next timestep with fresh noise (none after the last step).

    FastVideo, fastvideo/pipelines/stages/denoising.py `DmdDenoisingStage.forward`: x0 = x_t - sigma_t * v,
    then x_next = (1 - sigma_next) * x0 + sigma_next * noise, the noise drawn from the request's generator
    after the initial latents.
    """
    sigmas = [dmd_sigma(t) for t in timesteps]

    def step(i: int, flow: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x0 = latents - sigmas[i] * flow
        if i == len(sigmas) - 1:
            return x0
        return (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * draw_noise(latents.shape, generator)

    return Schedule(torch.tensor(timesteps, dtype=torch.int64, device=device), step)


class BranchTeam(Protocol):
    """Processes that share guidance's two passes (`pipeline.parallel.ParallelGroups`)."""

    branch: str | None  # "cond" or "uncond": the pass this process runs; None: both

    def exchange_branches(self, prediction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's prediction -> (unconditional, conditional), the same in every process."""


# The prompt's context, or a call that waits for it (made when the first conditional pass needs it).
PendingContext = torch.Tensor | Callable[[], torch.Tensor]


@dataclass
class DenoiseRequest:
    context: PendingContext  # [1, rows, text_dim]: the prompt's embeddings as the DiT takes them (`pipeline.dit.text_context`)
    negative_context: torch.Tensor  # the same for the unconditional pass
    frame_num: int
    height: int
    width: int
    steps: int
    shift: float
    guide_scale: float
    seed: int
    sampler: str = "unipc"  # one of SAMPLERS
    timesteps: list[int] | None = None  # dmd only: decreasing, in 1..1000, `steps` of them; default DMD_TIMESTEPS


def make_schedule(request: DenoiseRequest, device: torch.device, generator: torch.Generator) -> Schedule:
    """The request's sampler, checked: a setting it would ignore is an error, not a silent default."""
    if request.sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {request.sampler!r}")
    if request.timesteps is not None and request.sampler != "dmd":
        raise ValueError(f"timesteps are for the dmd sampler, not {request.sampler}")
    if request.sampler == "unipc":
        return unipc_schedule(request.steps, request.shift, device)
    if request.sampler == "euler":
        return euler_schedule(request.steps, request.shift, device)
    timesteps = list(DMD_TIMESTEPS if request.timesteps is None else request.timesteps)
    if len(timesteps) != request.steps:
        raise ValueError(f"dmd runs one step per timestep: {len(timesteps)} timesteps {timesteps}, but steps={request.steps}")
    in_range = all(0 < t <= NUM_TRAIN_TIMESTEPS for t in timesteps)
    if not in_range or any(t <= later for t, later in zip(timesteps, timesteps[1:])):
        raise ValueError(f"dmd timesteps must decrease within 1..{NUM_TRAIN_TIMESTEPS}, got {timesteps}")
    return dmd_schedule(timesteps, device, generator)


def denoise(
    transformer,
    request: DenoiseRequest,
    device: torch.device,
    on_progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
    uncond_transformer=None,
    branches_in_parallel: bool = True,
    team: BranchTeam | None = None,
) -> torch.Tensor:
    """Run the sampler and return the final float32 latents [1, 16, T, H/8, W/8].

    `uncond_transformer`: a copy of the DiT on a second GPU; the unconditional pass then runs there,
    from its own thread, at the same time as the conditional one (CFG-parallel, same output), unless
    `branches_in_parallel` is off: then one thread runs both, one after the other.
    `team`: this process is one rank of a team that splits guidance across processes
    (`pipeline.parallel`); the rank runs only its `branch` and swaps predictions with the other half.
    """
    dtype = transformer.dtype
    generator = torch.Generator(device=device).manual_seed(request.seed)
    schedule = make_schedule(request, device, generator)
    use_guidance = request.guide_scale > 1.0
    predict_cond = _dit_pass(transformer, "cond", request.context, device, dtype)
    if use_guidance:
        uncond_model = uncond_transformer if uncond_transformer is not None else transformer
        uncond_device = next(uncond_model.parameters()).device if uncond_transformer is not None else device
        predict_uncond = _dit_pass(uncond_model, "uncond", request.negative_context, uncond_device, dtype)
    across_team = team is not None and team.branch is not None and use_guidance
    own_pass = (predict_uncond if team.branch == "uncond" else predict_cond) if across_team else None
    in_parallel = uncond_transformer is not None and use_guidance and branches_in_parallel
    side_thread = ThreadPoolExecutor(max_workers=1) if in_parallel else None

    shape = latent_shape(request.frame_num, request.height, request.width, transformer.config.in_channels)
    latents = draw_noise(shape, generator)
    try:
        for i, t in enumerate(schedule.timesteps):
            _stop_if_cancelled(should_cancel, f"before step {i + 1} of {request.steps}")
            model_input = latents.to(dtype)
            timestep = t.expand(latents.shape[0])
            # The official DiT returns float32, so guidance is computed in float32.
            with guidance_step(transformer) as second_pass:  # block 0's self-attention, once for both passes
                if own_pass is not None:
                    noise_uncond, noise_pred = (p.float() for p in team.exchange_branches(own_pass(model_input, timestep)))
                elif side_thread is not None:
                    # Copied from this thread (a copy runs on the source GPU's stream): queued from the side
                    # thread, it could land behind the conditional pass's first kernels.
                    uncond_future = side_thread.submit(predict_uncond, model_input.to(uncond_device), timestep.to(uncond_device))
                elif use_guidance:
                    noise_uncond = predict_uncond(model_input, timestep).to(device).float()
                    # Between the two passes too: a cancelled job gives the GPU back within half a step.
                    _stop_if_cancelled(should_cancel, f"during step {i + 1} of {request.steps}")
                    if uncond_model is transformer:  # (a CFG-parallel copy, run in turn while it compiles, keeps nothing)
                        second_pass()
                if own_pass is None:
                    noise_pred = predict_cond(model_input, timestep).float()
                if side_thread is not None:
                    noise_uncond = uncond_future.result().to(device).float()
            if use_guidance:
                noise_pred = noise_uncond + request.guide_scale * (noise_pred - noise_uncond)
            latents = schedule.step(i, noise_pred, latents)
            if on_progress is not None:
                on_progress("denoise", i + 1, request.steps)
    finally:
        if side_thread is not None:
            side_thread.shutdown(wait=True)
    return latents


def _stop_if_cancelled(should_cancel: CancelCheck | None, where: str) -> None:
    if should_cancel is not None and should_cancel():
        raise GenerationCancelled(f"cancelled {where}")


def _dit_pass(transformer, branch: str, context: PendingContext, device: torch.device, dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    """One DiT forward for the `cond` or `uncond` branch, inside its own device and cache context.

    The named cache context keeps diffusers' step-cache hooks (first-block cache, TaylorSeer) from
    mixing the two branches' states; without a cache it does nothing. A pending `context` is waited
    for at the first forward.
    """
    ready: torch.Tensor | None = None

    @torch.inference_mode()
    def predict(latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        nonlocal ready
        if ready is None:
            ready = (context() if callable(context) else context).to(device, dtype)
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            with transformer.cache_context(branch):
                return transformer(
                    hidden_states=latents.to(device), timestep=timestep.to(device), encoder_hidden_states=ready, return_dict=False
                )[0]

    return predict

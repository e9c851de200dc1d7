"""The official Wan2.1 sampler: flow-matching UniPC on shifted sigmas with classifier-free guidance.

Read top to bottom it is the whole denoising loop, in the spirit of diffusers' `pipeline_wan.py`:
seeded float32 noise -> per step, the unconditional (unless g <= 1) and the conditional DiT pass ->
guidance -> one UniPC step. Nothing here knows about Ray or HTTP.

The unconditional pass goes first because it needs only the negative prompt, which is nearly always
cached: the prompt's embeddings may arrive as a call that waits for them (`DenoiseRequest.context`),
and step 1's unconditional pass runs while the prompt is still being encoded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import UniPCMultistepScheduler

from pipeline.dit import guidance_step

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


def initial_noise(shape: tuple[int, ...], seed: int, device: torch.device) -> torch.Tensor:
    """float32 noise from a generator seeded on the target device, as the official code draws it."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)


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


def denoise(
    transformer,
    request: DenoiseRequest,
    device: torch.device,
    on_progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
    uncond_transformer=None,
    branches_in_parallel: bool = True,
) -> torch.Tensor:
    """Run the sampler and return the final float32 latents [1, 16, T, H/8, W/8].

    `uncond_transformer`: a copy of the DiT on a second GPU; the unconditional pass then runs there,
    from its own thread, at the same time as the conditional one (CFG-parallel, same output), unless
    `branches_in_parallel` is off: then one thread runs both, one after the other.
    """
    dtype = transformer.dtype
    scheduler = make_scheduler(request.steps, request.shift, device)
    scheduler.set_begin_index(0)
    use_guidance = request.guide_scale > 1.0
    predict_cond = _dit_pass(transformer, "cond", request.context, device, dtype)
    if use_guidance:
        uncond_model = uncond_transformer if uncond_transformer is not None else transformer
        uncond_device = next(uncond_model.parameters()).device if uncond_transformer is not None else device
        predict_uncond = _dit_pass(uncond_model, "uncond", request.negative_context, uncond_device, dtype)
    in_parallel = uncond_transformer is not None and use_guidance and branches_in_parallel
    side_thread = ThreadPoolExecutor(max_workers=1) if in_parallel else None

    shape = latent_shape(request.frame_num, request.height, request.width, transformer.config.in_channels)
    latents = initial_noise(shape, request.seed, device)
    try:
        for i, t in enumerate(scheduler.timesteps):
            _stop_if_cancelled(should_cancel, f"before step {i + 1} of {request.steps}")
            model_input = latents.to(dtype)
            timestep = t.expand(latents.shape[0])
            # The official DiT returns float32, so guidance is computed in float32.
            with guidance_step(transformer) as second_pass:  # block 0's self-attention, once for both passes
                if side_thread is not None:
                    # Copied from this thread (a copy runs on the source GPU's stream): queued from the side
                    # thread, it could land behind the conditional pass's first kernels.
                    uncond_future = side_thread.submit(predict_uncond, model_input.to(uncond_device), timestep.to(uncond_device))
                elif use_guidance:
                    noise_uncond = predict_uncond(model_input, timestep).to(device).float()
                    # Between the two passes too: a cancelled job gives the GPU back within half a step.
                    _stop_if_cancelled(should_cancel, f"during step {i + 1} of {request.steps}")
                    if uncond_model is transformer:  # (a CFG-parallel copy, run in turn while it compiles, keeps nothing)
                        second_pass()
                noise_pred = predict_cond(model_input, timestep).float()
                if side_thread is not None:
                    noise_uncond = uncond_future.result().to(device).float()
            if use_guidance:
                noise_pred = noise_uncond + request.guide_scale * (noise_pred - noise_uncond)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
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

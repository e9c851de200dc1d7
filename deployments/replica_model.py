"""A generator replica's VideoModel: loaded and placed, then compiled and warmed; the same for a team's workers."""

from __future__ import annotations

import logging

import torch

from deployments.messages import GeneratorSettings
from pipeline.loading import ModelSource, parse_dtype
from pipeline.memory import MemoryPolicy
from pipeline.params import GenerationParams
from pipeline.startup import StartupPhases

log = logging.getLogger("ray.serve")


def load_model(source: ModelSource, settings: GeneratorSettings, startup: StartupPhases):
    """The replica's VideoModel (also each team worker's), loaded and placed on the device `settings` name."""
    with startup.phase("import"):
        # here, not at the top: `serve run`'s app builder imports this module, and diffusers'
        # import (seconds) would delay every replica's start
        from pipeline.generator import VideoModel
    device = settings.device
    if device == "cuda" and not torch.cuda.is_available():
        log.warning("VideoGenerator was placed for a GPU but sees no CUDA device; running on the CPU")
        device = "cpu"
    uncond_device = None
    if settings.cfg_parallel:
        if device == "cuda" and torch.cuda.device_count() >= 2:
            uncond_device = torch.device("cuda:1")
        else:
            log.warning("cfg_parallel asked for, but fewer than two CUDA devices are visible: one device runs both branches")
    model = VideoModel.load(source, torch.device(device), MemoryPolicy(settings.memory_policy), parse_dtype(settings.vae_dtype),
                            uncond_device, settings.attention, startup, settings.loras)
    if settings.step_cache is not None:
        model.enable_step_cache(settings.step_cache["kind"], **settings.step_cache["options"])
    return model


def warm_up(model, settings: GeneratorSettings, startup: StartupPhases) -> None:
    """Compile and warm for the operator's size and frame count, when `settings` asks for compiled blocks."""
    if settings.compile_for is None:
        return
    warm = GenerationParams(prompt="warm-up", **{k: v for k, v in settings.compile_for.items() if k in ("size", "frame_num")})
    seconds = model.compile(warm, settings.compile_cache_dir, startup)
    log.info("compiled DiT blocks and VAE norms, warmed for %s x %d frames in %.1fs", warm.size, warm.frame_num, seconds)

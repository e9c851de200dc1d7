"""The video stage: text embeddings + parameters -> frames, under a memory policy.

This is what a GPU replica holds. Text encoding is a separate stage (`pipeline.text`), so the
caller passes real-token embeddings and this module pads them to the DiT's 512-token context.
"""

from __future__ import annotations

import copy
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.attention import AttentionKernel, resolve_kernel, set_attention_kernel
from pipeline.compile_cache import STEP_CACHE_NOT_COMPILABLE, CompileCache, cache_key
from pipeline.diffusers_compat import reset_step_cache
from pipeline.dit import rearrange_blocks, text_context
from pipeline.loading import ModelSource, load_transformer, load_vae
from pipeline.lora import ServedAdapters, load_lora_state_dict
from pipeline.memory import MemoryPolicy, PlacedModels
from pipeline.parallel import ParallelGroups, split_sequence
from pipeline.params import GenerationParams
from pipeline.sampler import CancelCheck, DenoiseRequest, GenerationCancelled, ProgressCallback, denoise
from pipeline.startup import StartupPhases
from pipeline.vae import INDUCTOR_OPTIONS, compile_norms, speed_up_decode
from pipeline.video import Mp4Writer, decode_latents

log = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    frames: np.ndarray  # uint8 [F, H, W, 3]
    seed: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase
    peak_gpu_bytes: int | None = None
    video_path: Path | None = None  # the MP4, when generate() was asked to write one


# Latent frames the warm-up decodes: the first has no feature cache yet, the second meets an empty
# one, and from the third on every frame has the same shapes (two already compile every norm graph
# of the demo VAE; 81 frames are 21 latent frames).
WARM_DECODE_LATENT_FRAMES = 3


class VideoModel:
    """DiT + VAE placed by a memory policy; `generate` is one video.

    `uncond_device`: a second device that holds a copy of the DiT for the unconditional branch
    (CFG-parallel: one GPU per branch, same output, about half the step time).
    """

    def __init__(
        self,
        transformer,
        vae,
        device: torch.device,
        policy: MemoryPolicy = MemoryPolicy.RESIDENT,
        uncond_device: torch.device | None = None,
        attention: AttentionKernel = "auto",
        adapters: dict[str, tuple[dict[str, torch.Tensor], float]] | None = None,
        adapter_sources: dict[str, str] | None = None,
    ):
        """`adapters`: LoRA adapters to serve, name -> (state dict, scaling) as `pipeline.lora.load_lora_state_dict` reads them."""
        # Before the CFG-parallel copy below, so both copies run the same kernel.
        self.attention = resolve_kernel(attention, device)
        set_attention_kernel(transformer, self.attention)
        rearrange_blocks(transformer)  # before placement: the stream policy's offload hooks keep copies of the weights
        self.adapters = ServedAdapters(transformer, adapters, adapter_sources, device) if adapters else None
        speed_up_decode(vae, channels_last=device.type == "cuda")
        self.models = PlacedModels(transformer, vae, device, policy)
        self.device = device
        self.uncond_transformer = None
        if uncond_device is not None:
            if self.models.policy is not MemoryPolicy.RESIDENT:
                raise ValueError("CFG-parallel keeps both DiT copies resident; use memory policy 'resident'")
            self.uncond_transformer = copy.deepcopy(transformer).to(uncond_device)
            if self.adapters is not None:
                self.adapters.attach_copy(self.uncond_transformer)
        self.team: ParallelGroups | None = None
        self.step_cache: str | None = None
        self.compiled = False
        self._compiled_shapes: set[tuple[int, int, int]] = set()  # (frames, height, width) seen since compile()

    def split_across(self, team: ParallelGroups) -> None:
        """Run each video's DiT forwards on `team`: this process computes its rank's share
        (`pipeline.parallel`); every rank of the team must call `generate` or `follow` for each job."""
        if self.uncond_transformer is not None or self.models.policy is not MemoryPolicy.RESIDENT or self.step_cache is not None:
            raise ValueError("a parallel team runs the DiT resident, without a CFG-parallel copy or a step cache")
        split_sequence(self.models.transformer, team)
        self.team = team

    def enable_step_cache(self, kind: str, **options) -> None:
        """Opt-in step caching through diffusers' cache hooks; approximate, so off unless asked for."""
        from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig

        configs = {"first_block": FirstBlockCacheConfig, "taylorseer": TaylorSeerCacheConfig}
        if kind not in configs:
            raise ValueError(f"unknown step cache {kind!r}; allowed: {', '.join(configs)}")
        if kind == "taylorseer":
            # diffusers' default patterns (`^blocks.*attn`, full match) hook none of Wan's `attn1`/`attn2`:
            # forecast whole transformer blocks instead.
            options.setdefault("cache_identifiers", [r"^blocks\.\d+$"])
        for model in filter(None, (self.models.transformer, self.uncond_transformer)):
            model.enable_cache(configs[kind](**options))
        self.step_cache = kind

    @classmethod
    def load(
        cls,
        source: ModelSource,
        device: torch.device,
        policy: MemoryPolicy = MemoryPolicy.RESIDENT,
        vae_dtype: torch.dtype = torch.float32,
        uncond_device: torch.device | None = None,
        attention: AttentionKernel = "auto",
        phases: StartupPhases | None = None,
        loras: dict[str, str] | None = None,
    ) -> VideoModel:
        """Loads the DiT (`load_dit` in `phases`), then the VAE (`load_vae`), then moves them to the
        device under the policy (`place`).

        One after the other, not in two threads: diffusers' from_pretrained builds models inside
        accelerate's init_empty_weights, which swaps torch.nn.Module.register_parameter process-wide;
        two at once can leave the swap in place, and every model built later gets weights on the meta
        device (seen in the tests: the next text encoder load failed). The text encoder, the other
        large part, loads in its own replica at the same time.
        """
        phases = phases or StartupPhases()
        dit_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        started = time.perf_counter()
        with phases.phase("load_dit"):
            transformer = load_transformer(source, dit_dtype)
        with phases.phase("load_vae"):
            vae = load_vae(source, vae_dtype)
        adapters = None
        if loras:
            with phases.phase("load_loras"):
                adapters = {name: load_lora_state_dict(path) for name, path in loras.items()}
        with phases.phase("place"):
            model = cls(transformer, vae, device, policy, uncond_device, attention, adapters, loras)
        log.info("loaded DiT (%s, %s attention) + VAE (%s) from %s in %.1fs",
                 dit_dtype, model.attention, vae_dtype, source.folder, time.perf_counter() - started)
        return model

    def compile(self, warm_params: GenerationParams | None = None, cache_root: str | Path | None = None,
                phases: StartupPhases | None = None) -> float:
        """Regional torch.compile of the DiT's repeated blocks (one graph serves all) and the VAE's norms.

        The first call at each new shape compiles; warming with the expected shape at replica start
        means no request pays for it. With `cache_root`, the compiled code is kept in a folder keyed
        by `compile_cache_key` (pipeline.compile_cache): only the first start with a given key
        compiles, later ones load. Returns the seconds the warm-up took.
        """
        if self.step_cache is not None:
            raise ValueError(STEP_CACHE_NOT_COMPILABLE)
        phases = phases or StartupPhases()
        cache = CompileCache(cache_root, self.compile_cache_key(warm_params)) if cache_root is not None else None
        if cache is not None:
            with phases.phase("compile_cache_load"):
                cached = cache.use()
            log.info("compile cache %s: %s", cache.folder, "found, loading" if cached else "empty, compiling (first start with this key)")
        for model in filter(None, (self.models.transformer, self.uncond_transformer)):
            model.compile_repeated_blocks(fullgraph=True, options=INDUCTOR_OPTIONS)
        compile_norms(self.models.vae)
        self.compiled = True
        if warm_params is None:
            return 0.0
        started = time.perf_counter()
        with phases.phase("compile_warmup"):
            warm = warm_params.model_copy(update={"sample_steps": 1, "sample_solver": "unipc", "seed": 0})  # any sampler: the same graphs
            # One guidance step runs every DiT graph: block 0 keeping its self-attention (first pass)
            # and reusing it (second), and the other blocks. The decode's first latent frames meet every
            # shape the VAE's norms will: each later frame repeats the ones before it.
            negative = torch.zeros(1, self.text_dim, dtype=self.models.transformer.dtype)
            latents = self._denoise(warm, self._text_context("context", negative), negative)
            decode_started = time.perf_counter()
            decode_latents(self.models.vae, latents[:, :, :WARM_DECODE_LATENT_FRAMES])
            phases.record("warmup_decode", time.perf_counter() - decode_started)  # of compile_warmup: the VAE's share
        warmup_s = time.perf_counter() - started
        if cache is not None and not cached:
            with phases.phase("compile_cache_save"):
                log.info("saved %.1f MB of compile cache artifacts", cache.save() / 1e6)
        return warmup_s

    def compile_cache_key(self, warm_params: GenerationParams | None) -> str:
        """What the compiled code depends on beyond library versions: model configs, kernels, shapes."""
        configs = {name: {"class": type(model).__name__, **_hyperparameters(model.config)}
                   for name, model in (("transformer", self.models.transformer), ("vae", self.models.vae))}
        settings = {"inductor": INDUCTOR_OPTIONS, "attention": self.attention, "vae_dtype": str(self.models.vae.dtype),
                    "policy": self.policy.value, "cfg_parallel": self.uncond_transformer is not None,
                    "parallel": None if self.team is None else [self.team.layout.describe(), self.team.rank],
                    "warm": None if warm_params is None else [warm_params.size, warm_params.frame_num]}
        return cache_key(self.device, configs, settings)

    @property
    def policy(self) -> MemoryPolicy:
        return self.models.policy

    @property
    def text_dim(self) -> int:
        return self.models.transformer.config.text_dim

    def generate(
        self,
        params: GenerationParams,
        context: torch.Tensor | Callable[[], torch.Tensor],
        negative_context: torch.Tensor,
        on_progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
        video_path: str | Path | None = None,
    ) -> GenerationResult:
        """`context` / `negative_context`: real-token embeddings [n, text_dim]; `params.seed` must be concrete.

        `context` may be a call that waits for the prompt's embeddings: the sampler makes it after
        step 1's unconditional pass, so that pass overlaps the prompt's encoding
        (timings["prompt_wait"] is how long the call then blocked; timings["denoise"] includes it).
        With `video_path`, the MP4 is encoded while the VAE decodes (timings["mp4_write"] is what
        is left of the encoding after the decode).
        """
        if params.seed < 0:
            raise ValueError("generate() needs a concrete seed; call params.with_seed() first")
        timings: dict[str, float] = {}

        def prompt_context() -> torch.Tensor:
            started = time.perf_counter()
            embeds = context()
            timings["prompt_wait"] = time.perf_counter() - started
            return self._text_context("context", embeds)

        self._use_adapter(params, timings)
        on_gpu = self.device.type == "cuda"
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(self.device)
        started = time.perf_counter()
        latents = self._denoise(params, prompt_context if callable(context) else self._text_context("context", context),
                                negative_context, on_progress, should_cancel)
        timings["denoise"] = time.perf_counter() - started
        if should_cancel is not None and should_cancel():  # cancelled during the last step
            raise GenerationCancelled(f"cancelled before the decode, after {params.sample_steps} steps")

        if on_progress is not None:
            on_progress("decode", 0, 1)
        started = time.perf_counter()
        writer = Mp4Writer(video_path, params.width, params.height) if video_path is not None else None
        try:
            frames = decode_latents(self.models.vae, latents, writer.add if writer else None)
            timings["decode"] = time.perf_counter() - started
            if on_progress is not None:
                on_progress("decode", 1, 1)
            if writer is not None:
                if on_progress is not None:
                    on_progress("write", 0, 1)
                started = time.perf_counter()
                writer.close()
                timings["mp4_write"] = time.perf_counter() - started
        except BaseException:
            if writer is not None:
                writer.abort()  # stops ffmpeg and removes the partial file (a no-op after a failed close)
            raise
        peak = torch.cuda.max_memory_allocated(self.device) if on_gpu else None
        return GenerationResult(frames=frames, seed=params.seed, timings=timings, peak_gpu_bytes=peak,
                                video_path=writer.path if writer else None)

    def follow(self, params: GenerationParams, context: torch.Tensor | Callable[[], torch.Tensor], negative_context: torch.Tensor) -> None:
        """A team rank's part of the job that rank 0 runs with `generate`: the denoising, in step with it.

        Rank 0 alone decodes and reports progress; it also decides, for every rank, whether the job stops.
        """
        if self.team is None or self.team.rank == 0:
            raise ValueError("follow() is for ranks 1 and up of a parallel team; rank 0 calls generate()")
        self._use_adapter(params, {})
        if callable(context):
            self._denoise(params, lambda: self._text_context("context", context()), negative_context)
        else:
            self._denoise(params, self._text_context("context", context), negative_context)

    def _use_adapter(self, params: GenerationParams, timings: dict[str, float]) -> None:
        if params.lora and self.adapters is None:
            raise ValueError(f"lora {params.lora!r} asked for, but this model serves no LoRA adapters")
        if self.adapters is not None:
            started = time.perf_counter()
            self.adapters.use(params.lora or None, params.lora_scale)
            timings["lora_switch"] = time.perf_counter() - started

    def _denoise(self, params: GenerationParams, context: torch.Tensor | Callable[[], torch.Tensor],
                 negative_embeds: torch.Tensor, on_progress: ProgressCallback | None = None,
                 should_cancel: CancelCheck | None = None) -> torch.Tensor:
        """`params`' sampler over the DiT context `context` (or the call that waits for it) -> final latents."""
        request = DenoiseRequest(
            context=context,
            negative_context=self._text_context("negative_context", negative_embeds),
            frame_num=params.frame_num,
            height=params.height,
            width=params.width,
            steps=params.sample_steps,
            sampler=params.sample_solver,
            shift=params.sample_shift,
            guide_scale=params.sample_guide_scale,
            seed=params.seed,
        )
        if self.step_cache is not None:
            for model in filter(None, (self.models.transformer, self.uncond_transformer)):
                reset_step_cache(model)  # each video starts with an empty cache
        # The first generation at a shape compiles, and Dynamo cannot compile on two threads at once
        # (CFG-parallel fails with "using FX to symbolically trace a dynamo-optimized function"):
        # that one generation runs its two branches one after the other.
        shape = (params.frame_num, params.height, params.width)
        compiles = self.compiled and shape not in self._compiled_shapes
        if self.team is not None:  # every rank stops at the same step: rank 0's decision
            should_cancel = functools.partial(self.team.agree_with_rank0, should_cancel)
        with self.models.denoising():
            latents = denoise(self.models.transformer, request, self.device, on_progress, should_cancel,
                              self.uncond_transformer, branches_in_parallel=not compiles, team=self.team)
        if self.uncond_transformer is None or request.guide_scale > 1.0:  # else the copy did not compile
            self._compiled_shapes.add(shape)
        return latents

    def _text_context(self, name: str, embeds: torch.Tensor) -> torch.Tensor:
        """Checked [n, text_dim] real-token embeddings -> the DiT's context (`pipeline.dit.text_context`)."""
        if embeds.ndim != 2 or embeds.shape[1] != self.text_dim:
            raise ValueError(f"{name} must be [n_tokens, {self.text_dim}], got {list(embeds.shape)}")
        return text_context(embeds)


def _hyperparameters(config) -> dict:
    """A diffusers config without its bookkeeping (`_name_or_path`, `_use_default_values`, whose order
    is a set's and changes from process to process): what the model computes depends on the rest."""
    return {key: value for key, value in config.items() if not key.startswith("_")}

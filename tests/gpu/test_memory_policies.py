"""The memory policies on a GPU: where each keeps the DiT, its peak memory, and that all three compute the same video.

resident keeps DiT and VAE on the GPU; offload brings the DiT there only to denoise (the official
`--offload_model True`); stream brings one DiT block at a time from pinned CPU memory and tiles the VAE.
The real-size DiT (bf16) and VAE (fp32, the default vae_dtype) at 832x480, 17 frames, 2 steps: the
peak does not depend on the step count, and the VAE decodes one latent frame at a time, so the decode's
peak (the largest, bench/gpu.py's `policies`) is that of 81 frames too.
"""

import copy
from dataclasses import dataclass

import pytest
import torch

import pipeline.generator
from pipeline.generator import VideoModel
from pipeline.memory import MemoryPolicy
from pipeline.params import GenerationParams

from .helpers import DEVICE, GIB, build_dit, build_vae, free_gpu_memory, relative_error

PARAMS = GenerationParams(prompt="a red fox trots through fresh snow", size="832*480", frame_num=17, sample_steps=2, seed=42)
STREAM_PEAK_BOUND = 4 * GIB  # bench/gpu.py: 2.2 GiB at 81 frames (H100); resident peaks near 10 GiB
# The same kernels on the same weights whichever policy placed them, so the latents should be bit-identical;
# the bound only leaves room for a kernel choice that differs, far below a stale or half-copied block.
LATENTS_TOLERANCE = 1e-3


@dataclass
class Run:
    latents: torch.Tensor
    peak_bytes: int  # torch.cuda.max_memory_allocated during generate(), less what the process held before the models
    dit_device: dict[str, str]  # phase -> where the DiT's weights were when that phase reported progress
    dit_on_gpu_after: bool  # any DiT parameter or buffer still on the GPU after generate()


@pytest.fixture(scope="module")
def dit_weights():
    """One set of DiT weights, on the CPU; each policy places (and changes) a copy of its own."""
    return build_dit().cpu()


@pytest.fixture(scope="module")
def runs(dit_weights, embeddings) -> dict[MemoryPolicy, Run]:
    return {policy: generate(policy, dit_weights, embeddings) for policy in MemoryPolicy}


def generate(policy: MemoryPolicy, dit_weights, embeddings) -> Run:
    free_gpu_memory()
    held_before = torch.cuda.memory_allocated()
    model = VideoModel(copy.deepcopy(dit_weights), build_vae(torch.float32), DEVICE, policy)
    transformer = model.models.transformer
    dit_device, captured = {}, []
    decode = pipeline.generator.decode_latents

    def on_progress(phase: str, step: int, total: int) -> None:
        dit_device[phase] = next(transformer.parameters()).device.type

    def keep_latents(vae, latents, on_frames=None):
        captured.append(latents.float().cpu())
        return decode(vae, latents, on_frames)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline.generator, "decode_latents", keep_latents)
        result = model.generate(PARAMS, *embeddings, on_progress=on_progress)
    on_gpu = any(tensor.is_cuda for tensor in (*transformer.parameters(), *transformer.buffers()))
    run = Run(captured[0], result.peak_gpu_bytes - held_before, dit_device, on_gpu)
    del model, transformer, result
    free_gpu_memory()
    return run


def dit_bytes(dit_weights) -> int:
    return sum(parameter.numel() * parameter.element_size() for parameter in dit_weights.parameters())


def test_resident_keeps_the_dit_on_the_gpu(runs, dit_weights):
    run = runs[MemoryPolicy.RESIDENT]
    assert run.dit_device == {"denoise": "cuda", "decode": "cuda"} and run.dit_on_gpu_after
    assert run.peak_bytes > dit_bytes(dit_weights)


def test_offload_brings_the_dit_to_the_gpu_only_to_denoise(runs, dit_weights):
    run = runs[MemoryPolicy.OFFLOAD]
    assert run.dit_device == {"denoise": "cuda", "decode": "cpu"}
    assert not run.dit_on_gpu_after, "offload left DiT weights on the GPU after the generation"
    # The decode sets both peaks; offload's runs without the DiT's weights (bench/gpu.py: 7.5 against 10.2 GiB).
    resident = runs[MemoryPolicy.RESIDENT].peak_bytes
    assert run.peak_bytes < resident - 0.9 * dit_bytes(dit_weights), (run.peak_bytes / GIB, resident / GIB)


def test_stream_peaks_far_below_resident(runs):
    peak, resident = runs[MemoryPolicy.STREAM].peak_bytes, runs[MemoryPolicy.RESIDENT].peak_bytes
    assert peak < STREAM_PEAK_BOUND and peak < resident / 2, (peak / GIB, resident / GIB)


@pytest.mark.parametrize("policy", [MemoryPolicy.OFFLOAD, MemoryPolicy.STREAM])
def test_every_policy_computes_the_resident_latents(runs, policy):
    error = relative_error(runs[policy].latents, runs[MemoryPolicy.RESIDENT].latents)
    assert error < LATENTS_TOLERANCE, f"{policy.value} latents differ from resident's by {error:.2e}"

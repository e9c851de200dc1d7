"""What the GPU tests share: the real-size Wan2.1 T2V-1.3B DiT and VAE with random weights, prompt
embeddings and the error measure. As bench/gpu.py builds them: the kernels' speed and rounding depend
on the shapes, not on the weights' values."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel

import pipeline.generator
from pipeline.attention import flash3_unavailable_reason
from pipeline.original import bundled_config

DEVICE = torch.device("cuda")
GIB = 2**30

FLASH3_MISSING = flash3_unavailable_reason(DEVICE) if torch.cuda.is_available() else "needs a CUDA GPU"
requires_flash3 = pytest.mark.skipif(FLASH3_MISSING is not None, reason=f"needs FlashAttention-3: {FLASH3_MISSING}")


def build_dit() -> WanTransformer3DModel:
    """pipeline/configs/transformer.json (30 blocks, 1536 wide) in bf16 on the GPU, seeded."""
    torch.manual_seed(0)
    with DEVICE:
        model = WanTransformer3DModel.from_config(bundled_config("transformer"))
    return model.to(torch.bfloat16).eval().requires_grad_(False)


def build_vae(dtype: torch.dtype) -> AutoencoderKLWan:
    """pipeline/configs/vae.json in `dtype` on the GPU, seeded."""
    torch.manual_seed(0)
    with DEVICE:
        model = AutoencoderKLWan.from_config(bundled_config("vae"))
    return model.to(dtype).eval().requires_grad_(False)


def prompt_embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    """Real-token embeddings as the text stage returns them: a 40-token prompt and a 120-token negative prompt, bf16."""
    generator = torch.Generator().manual_seed(1)
    prompt, negative = (torch.randn(160, 4096, generator=generator) * 0.1).to(torch.bfloat16).split([40, 120])
    return prompt, negative


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """|got - expected| / |expected| (Frobenius norms, in float64), as bench/gpu.py reports it."""
    got, expected = got.double().cpu(), expected.double().cpu()
    return float((got - expected).norm() / expected.norm())


def free_gpu_memory() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def final_latents(model, params, embeddings) -> torch.Tensor:
    """One generation through VideoModel.generate, its latents taken where the decode would start."""
    captured = []

    def keep_latents(vae, latents, on_frames=None):
        captured.append(latents.float().cpu())
        return np.zeros((0, params.height, params.width, 3), np.uint8)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline.generator, "decode_latents", keep_latents)
        model.generate(params, *embeddings)
    return captured[0]

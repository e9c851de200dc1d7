"""The Wan VAE decode, made faster without changing what it computes.

Profiled on an H100 at 832x480x81 (`bench/profile_gpu.py`), diffusers' bf16 decode spends more GPU
time copying and in elementwise kernels than in its convolutions:

- every causal convolution first copies its input into a zero-padded tensor (`F.pad`). cuDNN pads
  height and width itself for free, so only the causal time padding needs that copy — and the
  feature cache already supplies it for every latent frame after the first. Same numbers (tested).
- NCDHW activations make cuDNN transpose to NHWC and back around each convolution; channels-last
  weights keep the activations channels-last throughout (GPU only: bf16 rounding moves, max 6/255).
- each RMS norm is five memory passes eagerly and one compiled (`compile_norms`, with the DiT).
- each 2x nearest-neighbour upsampling converts to float32 and back around the copy; nearest
  upsampling only copies values, so doing it in the input's dtype gives the same pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanRMS_norm, WanUpsample

from pipeline.diffusers_compat import causal_padding, swap_class
from pipeline.torch_compat import raise_recompile_limit

# For every region we compile (DiT blocks, VAE norms), not process-wide: tunes each fused kernel's launch
# shape at compile time, a faster forward for a longer warm-up
# (bench/results/archive/profile-nvidia-h100-80gb-hbm3-2026-11-27-loop-options.json).
INDUCTOR_OPTIONS = {"coordinate_descent_tuning": True}

# A compiled norm sees each of its shapes (channels x resolution x frames per latent frame, tiles)
# once; more shapes than Dynamo's default of 8 recompiles would silently fall back to eager.
NORM_RECOMPILE_LIMIT = 64


class CausalConv3dPaddedInKernel(WanCausalConv3d):
    """WanCausalConv3d whose height/width zero padding happens inside the convolution kernel.

    diffusers pads (w, w, h, h, 2t, 0) with F.pad; time stays causal (all before, from the cache or
    zeros), height and width go to the convolution's symmetric padding.
    """

    def forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
        width_pad, _, height_pad, _, time_pad, _ = causal_padding(self)
        if cache_x is not None and time_pad > 0:
            x = torch.cat([cache_x.to(x.device), x], dim=2)
            time_pad -= cache_x.shape[2]
        if time_pad > 0:
            x = F.pad(x, (0, 0, 0, 0, time_pad, 0))
        return F.conv3d(x, self.weight, self.bias, self.stride, (0, height_pad, width_pad), self.dilation, self.groups)


class UpsampleInInputDtype(WanUpsample):
    """WanUpsample without its float32 round trip: nearest-neighbour modes copy values exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.Upsample.forward(self, x)


def speed_up_decode(vae: torch.nn.Module, channels_last: bool) -> None:
    """Padding inside the convolutions, upsampling in the VAE's dtype (both always) and channels-last
    weights (`channels_last`), in place; modules keep their parameters and buffers, only forward changes."""
    pad_inside_convolutions(vae)
    for module in vae.modules():
        if type(module) is WanUpsample and module.mode.startswith("nearest"):
            swap_class(module, UpsampleInInputDtype)
    if channels_last:
        channels_last_weights(vae)


def pad_inside_convolutions(vae: torch.nn.Module) -> None:
    """Every causal convolution becomes `CausalConv3dPaddedInKernel` (same parameters, exact)."""
    for module in vae.modules():
        if type(module) is WanCausalConv3d:
            swap_class(module, CausalConv3dPaddedInKernel)


def channels_last_weights(model: torch.nn.Module) -> None:
    """3-D convolution weights in channels-last layout, so cuDNN keeps the activations NDHWC too."""
    for module in model.modules():
        if isinstance(module, torch.nn.Conv3d):
            module.weight.data = module.weight.data.to(memory_format=torch.channels_last_3d)


def compile_norms(vae: torch.nn.Module) -> None:
    """torch.compile each RMS norm of the VAE (the first decode at a new shape compiles it)."""
    raise_recompile_limit(NORM_RECOMPILE_LIMIT)
    for module in vae.modules():
        if isinstance(module, WanRMS_norm):
            module.compile(options=INDUCTOR_OPTIONS)

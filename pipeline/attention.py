"""Which attention kernel the DiT runs: PyTorch SDPA or FlashAttention-3.

Attention is about two thirds of a Wan DiT forward at 832x480x81 (32,760 tokens). On Hopper,
FlashAttention-3 computes the same exact attention faster than PyTorch's best SDPA kernel (cuDNN),
so `auto` picks it wherever it can run: a CUDA device of compute capability 9.x with a FA3 build
installed. Everything else (CPU, other GPUs, no FA3) uses SDPA. Self- and cross-attention run the
same kernel.

diffusers ships the `_flash_3` backend (a custom op with a fake kernel, so regional compile traces
it) but looks for upstream's `flash_attn_interface` module; PyPI's forward-only build, `fa3-fwd`,
names it `fa3_fwd_interface`. We hand that build's function to diffusers' backend.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:  # torch is imported where used: the CLI lists the kernels before importing it
    import torch

AttentionKernel = Literal["auto", "sdpa", "flash3"]
ATTENTION_KERNELS: tuple[str, ...] = get_args(AttentionKernel)


def flash3_function():
    """FA3's `flash_attn_func` from whichever build is installed, or None."""
    for module in ("flash_attn_interface", "fa3_fwd_interface"):
        if importlib.util.find_spec(module) is not None:
            return importlib.import_module(module).flash_attn_func
    return None


def flash3_unavailable_reason(device: torch.device) -> str | None:
    """Why FA3 cannot run on `device`, or None when it can."""
    if device.type != "cuda":
        return f"FlashAttention-3 needs a CUDA GPU, not {device.type}"
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return f"FlashAttention-3 needs a Hopper GPU (compute capability 9.x), this one is {major}.{minor}"
    if flash3_function() is None:
        return "FlashAttention-3 is not installed (pip install fa3-fwd)"
    return None


def resolve_kernel(kernel: AttentionKernel, device: torch.device) -> str:
    """The kernel `kernel` means on `device`: `auto` falls back to SDPA, an explicit `flash3` must run."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_KERNELS)}, got {kernel!r}")
    if kernel == "sdpa":
        return "sdpa"
    reason = flash3_unavailable_reason(device)
    if reason is None:
        return "flash3"
    if kernel == "flash3":
        raise RuntimeError(f"attention: flash3 was asked for, but {reason}")
    return "sdpa"


def set_attention_kernel(transformer: torch.nn.Module, kernel: str) -> None:
    """Point every attention processor of `transformer` at `kernel` ("sdpa" or "flash3")."""
    from pipeline import diffusers_compat

    if kernel == "flash3":
        diffusers_compat.provide_flash3_function(flash3_function())
    backend = diffusers_compat.NATIVE_BACKEND if kernel == "sdpa" else diffusers_compat.FLASH3_BACKEND
    diffusers_compat.set_processor_backends(transformer, backend)

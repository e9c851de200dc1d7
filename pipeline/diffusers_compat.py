"""diffusers' private API, in one place: what pipeline/ and bench/ use that diffusers does not promise to keep.

Written for diffusers>=0.42,<0.50 (pyproject.toml's pin); tests/test_compat.py checks each use against
the installed diffusers, so an upgrade that drops or changes one fails there, by name.

- `AutoencoderKLWan._feat_map` / `_conv_idx`: the feature cache `_decode` threads through the decoder,
  one latent frame at a time. `decode_latent_frame` is one turn of that loop, so pixels can leave
  the GPU while the next frame decodes (pipeline/video.py).
- `WanCausalConv3d._padding`: its causal padding, which it moves out of `padding` (pipeline/vae.py).
- attention processors' `_attention_backend`, `AttentionBackendName._FLASH_3` and
  `attention_dispatch.flash_attn_3_func`: the public `ModelMixin.set_attention_backend` accepts only
  upstream's FA3 build (`flash_attn_interface`, not PyPI's `fa3-fwd`) and also sets a process-wide
  default backend, so we label the processors ourselves (pipeline/attention.py).
- `_parallel_config`: carried with the backend when `replace_processor` hands a module a new processor.
- a module's `__class__`: the fast paths keep diffusers' modules, parameters and hooks and change only
  their `forward`; `swap_class` refuses any module that is not exactly the class the replacement extends.

`CacheMixin._reset_stateful_cache` is replaced by the public calls it is made of (`reset_step_cache`).
"""

from __future__ import annotations

import diffusers
import torch
from diffusers.hooks import HookRegistry
from diffusers.models import attention_dispatch
from diffusers.models.attention_dispatch import AttentionBackendName

SUPPORTED_VERSIONS = "diffusers>=0.42,<0.50"

NATIVE_BACKEND = AttentionBackendName.NATIVE  # PyTorch's scaled_dot_product_attention
FLASH3_BACKEND = AttentionBackendName._FLASH_3  # diffusers marks its experimental backends with "_"


def decode_latent_frame(vae, latents: torch.Tensor, index: int) -> torch.Tensor:
    """Latent frame `index` of `latents` (after `post_quant_conv`) -> its pixels, as `AutoencoderKLWan._decode` does it.

    The decoder reads and extends the VAE's feature cache: call `vae.clear_cache()` before frame 0 and
    decode the frames in order.
    """
    vae._conv_idx = [0]
    return vae.decoder(latents[:, :, index : index + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                       first_chunk=index == 0)


def causal_padding(conv: torch.nn.Module) -> tuple[int, ...]:
    """A `WanCausalConv3d`'s padding in F.pad's order, (w, w, h, h, 2t, 0): time padded before only."""
    return conv._padding


def provide_flash3_function(flash_attn_func) -> None:
    """Hand diffusers' `_flash_3` backend an FA3 build's `flash_attn_func`, unless it imported one itself."""
    if attention_dispatch.flash_attn_3_func is None:
        attention_dispatch.flash_attn_3_func = flash_attn_func


def set_processor_backends(model: torch.nn.Module, backend: AttentionBackendName) -> None:
    """Make every attention processor of `model` dispatch to `backend` (no process-wide default changes)."""
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_attention_backend"):
            processor._attention_backend = backend


def attention_backend_of(processor) -> AttentionBackendName | None:
    """The backend `processor` dispatches to; None: diffusers' active default."""
    return processor._attention_backend


def replace_processor(attention: torch.nn.Module, processor) -> None:
    """`attention.set_processor(processor)`, keeping the backend and parallel config the old processor was given."""
    processor._attention_backend = attention.processor._attention_backend
    processor._parallel_config = attention.processor._parallel_config
    attention.set_processor(processor)


def swap_class(module: torch.nn.Module, replacement: type) -> None:
    """Make `module` a `replacement`: same parameters, buffers and hooks, the replacement's `forward`.

    `replacement` extends one diffusers class and `module` must be exactly that class, so a diffusers
    release that builds the module from another class fails here rather than running changed code.
    """
    expected = replacement.__base__
    if type(module) is not expected:
        raise TypeError(f"{replacement.__qualname__} replaces diffusers' {expected.__module__}.{expected.__qualname__}, "
                        f"got {type(module).__module__}.{type(module).__qualname__} "
                        f"(written for {SUPPORTED_VERSIONS}, installed {diffusers.__version__})")
    module.__class__ = replacement


def reset_step_cache(model: torch.nn.Module) -> None:
    """Empty the state of every step-cache hook on `model` and its submodules (`CacheMixin._reset_stateful_cache`)."""
    HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks(recurse=True)


def float32_module_names(model) -> list[str]:
    """The submodules a diffusers model keeps in float32 whatever its dtype (`ModelMixin._keep_in_fp32_modules`):
    a release checkpoint cast to bf16 by hand must leave them as from_pretrained(torch_dtype=...) would."""
    return list(model._keep_in_fp32_modules or [])

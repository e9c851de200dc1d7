"""The Wan DiT's block math, rearranged for fewer memory passes; the function it computes is unchanged.

Profiled on an H100 at 832x480x81 (`bench/profile_gpu.py`), a compiled forward spends about 42 ms
of its 457 ms in fused elementwise kernels, and two of them stand out:

- the FFN's tanh GELU reads and writes the 8,960-wide hidden activation once more after its
  up-projection (12 ms per forward). cuBLASLt can apply that GELU in the GEMM's epilogue, while the
  result is still in registers: `linear_gelu_tanh`.
- RMS norm + rotary embedding of the queries and keys (12 ms per forward) rotates interleaved
  (even, odd) pairs, so every load and store is strided. Permuting each head's dimensions to
  (all evens, all odds) in the query/key projections and norm weights turns that into two
  contiguous halves. Attention only sees q.k dot products, which a permutation applied to both q
  and k leaves unchanged, and the RMS norm's mean square does not depend on order.

Both change only the order and place of rounding, so `VideoModel` always applies them (eager and
compiled, every memory policy); `bench/profile_gpu.py` measures the forward's difference from
diffusers' arrangement on the GPU, and the CPU tests check it with the tiny model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.activations import GELU
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor


@torch.library.custom_op("wan_t2v::linear_gelu_tanh", mutates_args=())
def linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(x @ weight.T + bias, approximate="tanh"); an opaque op, so Inductor keeps it whole."""
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


@linear_gelu_tanh.register_kernel("cuda")
def _linear_gelu_tanh_cuda(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    # cuBLASLt's GELU_BIAS epilogue, which is the tanh form (PyTorch's CPU kernel for this op is erf).
    out = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
    return out.view(*x.shape[:-1], weight.shape[0])


@linear_gelu_tanh.register_fake
def _linear_gelu_tanh_shape(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class GeluInEpilogue(GELU):
    """diffusers' GELU projection (same parameters) computed by `linear_gelu_tanh`."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return linear_gelu_tanh(hidden_states, self.proj.weight, self.proj.bias)


class HalvesRopeProcessor(WanAttnProcessor):
    """Wan's self-attention for heads whose dimensions are stored (evens, odds): see `deinterleave_rope`."""

    def __call__(self, attn: WanAttention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))  # [B, L, heads, head_dim]
        key = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        # diffusers' tables repeat each frequency for the two members of a pair: one of each is enough.
        cos, sin = rotary_emb[0][..., 0::2], rotary_emb[1][..., 1::2]  # [1, L, 1, head_dim / 2]
        query, key = rotate_halves(query, cos, sin), rotate_halves(key, cos, sin)
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                    backend=self._attention_backend)
        return attn.to_out[1](attn.to_out[0](out.flatten(2, 3).type_as(query)))


def rotate_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding of Wan's interleaved pairs, for heads stored (evens, odds)."""
    evens, odds = x.chunk(2, dim=-1)
    return torch.cat([evens * cos - odds * sin, evens * sin + odds * cos], dim=-1).type_as(x)


def deinterleave_rope(transformer: torch.nn.Module) -> None:
    """Store each self-attention head's query/key dimensions as (evens, odds), in place."""
    for module in transformer.modules():
        if not isinstance(module, WanAttention) or module.is_cross_attention:
            continue
        if type(module.processor) is not WanAttnProcessor or module.add_k_proj is not None or getattr(module, "fused_projections", False):
            raise ValueError("deinterleave_rope expects diffusers' text-to-video WanAttention with separate q/k/v projections")
        head_dim = module.inner_dim // module.heads
        within_head = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
        order = (torch.arange(module.heads)[:, None] * head_dim + within_head).flatten().to(module.to_q.weight.device)
        for tensor in (module.to_q.weight, module.to_q.bias, module.to_k.weight, module.to_k.bias,
                       module.norm_q.weight, module.norm_k.weight):
            tensor.data = tensor.data[order]
        module.processor.__class__ = HalvesRopeProcessor  # keeps the processor's attention backend


def fuse_elementwise(transformer: torch.nn.Module) -> None:
    """Both rearrangements, in place: GELU in the up-projection's epilogue, (evens, odds) RoPE heads."""
    for module in transformer.modules():
        if type(module) is GELU and module.approximate == "tanh" and module.proj.bias is not None:
            module.__class__ = GeluInEpilogue
    deinterleave_rope(transformer)

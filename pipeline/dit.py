"""The Wan DiT's block math, rearranged for fewer memory passes; the function it computes is unchanged.

Profiled on an H100 at 832x480x81 (`bench/profile_gpu.py`; the figures:
bench/results/archive/profile-nvidia-h100-80gb-hbm3-2026-11-26-fused.json), a compiled forward
spends a tenth of its time in fused elementwise kernels, and two of them stand out:

- the FFN's tanh GELU reads and writes the 8,960-wide hidden activation once more after its
  up-projection. cuBLASLt can apply that GELU in the GEMM's epilogue, while the result is still in
  registers: `linear_gelu_tanh`.
- RMS norm + rotary embedding of the queries and keys rotates interleaved
  (even, odd) pairs, so every load and store is strided. Permuting each head's dimensions to
  (all evens, all odds) in the query/key projections and norm weights turns that into two
  contiguous halves. Attention only sees q.k dot products, which a permutation applied to both q
  and k leaves unchanged, and the RMS norm's mean square does not depend on order.

Both change only the order and place of rounding, so `VideoModel` always applies them (eager and
compiled, every memory policy); `bench/profile_gpu.py` measures the forward's difference from
diffusers' arrangement on the GPU, and the CPU tests check it with the tiny model.

One more saving skips work whose result is known: the two passes of a guidance step give block 0
the same tokens, so its self-attention is computed once per step (`SharedSelfAttentionProcessor`; no
change in rounding).

Cross-attention keeps diffusers' processor over the full 512-row context, as the model was trained.
Attending to the real tokens plus two rows carrying the padding's weight as a bias was 0.3 % faster a
video (bench/results/archive/nvidia-h100-80gb-hbm3-2026-11-27-fast-v5.json, `fast_padded`), but its
length followed the prompt: compiled blocks then needed a graph per alignment of that length
(Inductor guards on rows % 8) and a dynamic size, which doubled the start-up warm-up. One fixed
length compiles once, and no prompt can make a job compile.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from diffusers.models.activations import GELU
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor

from pipeline.diffusers_compat import attention_backend_of, replace_processor, swap_class
from pipeline.parallel import sequence_parallel_attention
from pipeline.text import pad_context
from pipeline.torch_compat import addmm_gelu


@torch.library.custom_op("wan_t2v::linear_gelu_tanh", mutates_args=())
def linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(x @ weight.T + bias, approximate="tanh"); an opaque op, so Inductor keeps it whole."""
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


@linear_gelu_tanh.register_kernel("cuda")
def _linear_gelu_tanh_cuda(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    # cuBLASLt's GELU_BIAS epilogue, which is the tanh form (PyTorch's CPU kernel for this op is erf).
    out = addmm_gelu(bias, x.reshape(-1, x.shape[-1]), weight.t())
    return out.view(*x.shape[:-1], weight.shape[0])


@linear_gelu_tanh.register_fake
def _linear_gelu_tanh_shape(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class GeluInEpilogue(GELU):
    """diffusers' GELU projection (same parameters) computed by `linear_gelu_tanh`."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return linear_gelu_tanh(hidden_states, self.proj.weight, self.proj.bias)


class HalvesRopeProcessor(WanAttnProcessor):
    """Wan's self-attention for heads whose dimensions are stored (evens, odds): see `deinterleave_rope`.

    With `split_sequence` (set by `pipeline.parallel.split_sequence`) the tokens are one rank's shard,
    and attention spans the whole team's sequence.
    """

    split_sequence = False

    def __call__(self, attn: WanAttention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))  # [B, L, heads, head_dim]
        key = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        # diffusers' tables repeat each frequency for the two members of a pair: one of each is enough.
        cos, sin = rotary_emb[0][..., 0::2], rotary_emb[1][..., 1::2]  # [1, L, 1, head_dim / 2]
        query, key = rotate_halves(query, cos, sin), rotate_halves(key, cos, sin)
        if self.split_sequence:
            out = sequence_parallel_attention(query, key, value, attention_backend_of(self).value)
        else:
            out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                        backend=attention_backend_of(self))
        return attn.to_out[1](attn.to_out[0](out.flatten(2, 3).type_as(query)))


class SharedSelfAttentionProcessor(HalvesRopeProcessor):
    """Block 0's self-attention, computed once per guidance step for both branches.

    Both passes of a guidance step feed the DiT the same latents and timestep, and nothing before
    block 0's cross-attention sees the text, so block 0's self-attention output is the same for both
    (1/30 of the DiT's attention). Within `guidance_step` the
    first pass keeps its output in `kept` and the second returns it. A first pass that does not run
    block 0 (a step cache's forecast) keeps nothing, and the second then computes its own.
    """

    def __init__(self) -> None:
        super().__init__()
        self.keep = False  # on the instance from the start: compiled blocks guard on its attributes
        self.kept: torch.Tensor | None = None

    def __call__(self, attn: WanAttention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if self.kept is not None:
            return self.kept
        out = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if self.keep:
            self.kept = out
        return out


@contextlib.contextmanager
def guidance_step(transformer: torch.nn.Module) -> Iterator[Callable[[], None]]:
    """Around one step's passes of `transformer`; yields the call that makes the next pass reuse
    the first one's block-0 self-attention (a no-op unless `transformer` shares it).

    The first pass keeps its output whether or not a second follows, so a step with guidance and
    one without run the same compiled block-0 code (no compile at request time for either).
    """
    processor = transformer.blocks[0].attn1.processor
    if not isinstance(processor, SharedSelfAttentionProcessor):
        yield lambda: None
        return

    def reuse() -> None:
        processor.keep = False

    processor.keep, processor.kept = True, None
    try:
        yield reuse
    finally:
        processor.keep, processor.kept = False, None


def text_context(embeds: torch.Tensor) -> torch.Tensor:
    """[n, dim] real-token embeddings -> the [1, 512, dim] zero-padded context the DiT's cross-attention takes."""
    return pad_context(embeds).unsqueeze(0)


def share_first_self_attention(transformer: torch.nn.Module) -> None:
    """Let block 0's self-attention serve both passes of a guidance step (see `guidance_step`)."""
    attention = transformer.blocks[0].attn1
    if type(attention.processor) is not HalvesRopeProcessor:
        raise ValueError("share_first_self_attention expects the (evens, odds) self-attention of `deinterleave_rope`")
    replace_processor(attention, SharedSelfAttentionProcessor())


def rotate_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding of Wan's interleaved pairs, for heads stored (evens, odds)."""
    evens, odds = x.chunk(2, dim=-1)
    return torch.cat([evens * cos - odds * sin, evens * sin + odds * cos], dim=-1).type_as(x)


def rope_halves_order(attention: WanAttention) -> torch.Tensor:
    """The row order that stores each head's query/key dimensions as (evens, odds): `deinterleave_rope`
    applies it to the projections, pipeline/lora.py to a LoRA adapter's up-projections."""
    head_dim = attention.inner_dim // attention.heads
    within_head = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    return (torch.arange(attention.heads)[:, None] * head_dim + within_head).flatten()


def deinterleave_rope(transformer: torch.nn.Module) -> None:
    """Store each self-attention head's query/key dimensions as (evens, odds), in place."""
    for module in transformer.modules():
        if not isinstance(module, WanAttention) or module.is_cross_attention:
            continue
        if type(module.processor) is not WanAttnProcessor or module.add_k_proj is not None or getattr(module, "fused_projections", False):
            raise ValueError("deinterleave_rope expects diffusers' text-to-video WanAttention with separate q/k/v projections")
        order = rope_halves_order(module).to(module.to_q.weight.device)
        for tensor in (module.to_q.weight, module.to_q.bias, module.to_k.weight, module.to_k.bias,
                       module.norm_q.weight, module.norm_k.weight):
            tensor.data = tensor.data[order]
        replace_processor(module, HalvesRopeProcessor())


def rearrange_blocks(transformer: torch.nn.Module) -> None:
    """Everything above, in place: GELU in the up-projection's epilogue, (evens, odds) RoPE heads,
    block 0's self-attention shared by the two passes of a guidance step."""
    for module in transformer.modules():
        if type(module) is GELU and module.approximate == "tanh" and module.proj.bias is not None:
            swap_class(module, GeluInEpilogue)
    deinterleave_rope(transformer)
    share_first_self_attention(transformer)

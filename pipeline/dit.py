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

Two more savings skip work whose result is known:

- the two passes of a guidance step give block 0 the same tokens, so its self-attention is computed
  once per step (`SharedSelfAttentionProcessor`; no change in rounding);
- cross-attention attends to the prompt's real tokens and two rows standing for its padding instead
  of 512 rows (`PaddingAsBiasProcessor`), which the kernels do faster
  (bench/results/archive/profile-nvidia-h100-80gb-hbm3-2026-11-27-cross.json).
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
from pipeline.text import MAX_TEXT_TOKENS, PADDING_ROWS, compact_context, pad_context
from pipeline.torch_compat import addmm_gelu, maybe_mark_dynamic


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


class PaddingAsBiasProcessor(WanAttnProcessor):
    """Wan's cross-attention over a compact context: the real tokens, then two rows standing for the padding.

    The DiT was trained on prompts zero-padded to 512 tokens. Padding rows are all the same vector, so
    their keys and values are too, and softmax attention over N equal keys equals attention over one
    of them with log(N) added to its logit. The bias reaches the kernel as a bf16 mask, whose rounding
    could move the padding's weight by up to 1.6 %, so two rows share it: the first carries log(N)
    rounded down to a bf16 value, the second the small remainder. `compact_context` builds the
    context; this processor reads N from its length (N = 512 + 2 - rows), so every context it is
    given must be compact.
    """

    def __call__(self, attn: WanAttention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, rotary_emb=None) -> torch.Tensor:
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))  # [B, L, heads, head_dim]
        key = attn.norm_k(attn.to_k(encoder_hidden_states)).unflatten(2, (attn.heads, -1))  # [B, rows, heads, head_dim]
        value = attn.to_v(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        bias = padding_bias(key.shape[1], query.device).to(query.dtype)[None, None, None, :]  # [1, 1, 1, rows]
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=bias)
        return attn.to_out[1](attn.to_out[0](out.transpose(1, 2).flatten(2, 3).type_as(query)))


def padding_bias(rows: int, device: torch.device) -> torch.Tensor:
    """The [rows] logit bias of a compact context: 0 for each real token, then log(weight) of its two padding rows."""
    padding = torch.full((), MAX_TEXT_TOKENS + PADDING_ROWS - rows, dtype=torch.float32, device=device)
    bulk = padding.log().view(torch.int32).bitwise_and(-(1 << 16)).view(torch.float32)  # rounded down to a bf16 value
    remainder = (padding - bulk.exp()).clamp(min=0.0).log()  # -inf when nothing remains
    # Built from `rows` alone: a tensor of rows - 2 elements would make compiled code specialize a
    # one-token prompt's context (Dynamo treats sizes 0 and 1 as constants).
    position = torch.arange(rows, device=device)
    return torch.where(position == rows - 1, remainder, torch.where(position == rows - 2, bulk, 0.0))


def text_context(transformer: torch.nn.Module, embeds: torch.Tensor) -> torch.Tensor:
    """[n, dim] real-token embeddings -> the [1, rows, dim] context `transformer`'s cross-attention expects."""
    compact = isinstance(transformer.blocks[0].attn2.processor, PaddingAsBiasProcessor)
    return (compact_context if compact else pad_context)(embeds).unsqueeze(0)


def compact_cross_attention(transformer: torch.nn.Module) -> None:
    """Cross-attention over compact contexts (`PaddingAsBiasProcessor`), in place.

    The context's length then follows the prompt: compiled blocks treat it as a dynamic size from the
    first compile, so a prompt of a new length does not compile again.
    """
    for block in transformer.blocks:
        if type(block.attn2.processor) is not WanAttnProcessor or block.attn2.add_k_proj is not None:
            raise ValueError("compact_cross_attention expects diffusers' text-to-video cross-attention")
        replace_processor(block.attn2, PaddingAsBiasProcessor())
    transformer.condition_embedder.register_forward_hook(_text_rows_dynamic)


def _text_rows_dynamic(_module, _inputs, outputs) -> None:
    maybe_mark_dynamic(outputs[2], 1)  # the embedded context: [B, rows, dim]


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
    block 0's self-attention shared by the two passes of a guidance step, compact cross-attention."""
    for module in transformer.modules():
        if type(module) is GELU and module.approximate == "tanh" and module.proj.bias is not None:
            swap_class(module, GeluInEpilogue)
    deinterleave_rope(transformer)
    share_first_self_attention(transformer)
    compact_cross_attention(transformer)

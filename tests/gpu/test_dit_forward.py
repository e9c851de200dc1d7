"""pipeline/dit.py's rearranged DiT computes diffusers' stock forward, at the real size, with SDPA and with FA3.

The rearrangement (the FFN's tanh GELU in cuBLASLt's GEMM epilogue, (evens, odds) RoPE heads, block 0's
shareable self-attention) and FA3 change only where bf16 rounds. The CPU tests check the function in float32 on the tiny model; this
checks the CUDA kernels at the production shapes: 832x480, 17 frames (7,800 tokens, 12 heads of 128),
a 40-token prompt in the fixed 512-row context. The reference is the stock model with PyTorch SDPA, for both kernels: the SDPA case
measures the rearrangement alone, the FA3 case the rearrangement and the kernel together.
"""

import copy

import pytest
import torch
from diffusers.models import attention_dispatch

from pipeline.attention import set_attention_kernel
from pipeline.dit import rearrange_blocks, text_context
from pipeline.lora import ServedAdapters

from .helpers import DEVICE, FLASH3_MISSING, build_dit, relative_error, requires_flash3

# One 30-block bf16 forward: bench/profile_gpu.py measures 0.36-0.38 % between variants that only move
# rounding, and the epilogue GELU alone rounds 0.26 % at the op. 2 % is several times that; a real fault
# (a missed permutation, padding weighed wrongly, a kernel on the wrong layout) moves it by tens of percent.
TOLERANCE = 0.02


@pytest.fixture(scope="module")
def stock():
    model = build_dit()
    set_attention_kernel(model, "sdpa")
    return model


@pytest.fixture(scope="module")
def rearranged(stock):
    model = copy.deepcopy(stock)
    rearrange_blocks(model)
    return model


@pytest.fixture(scope="module")
def inputs(embeddings) -> dict:
    latents = torch.randn(1, 16, 5, 60, 104, generator=torch.Generator().manual_seed(2))
    return {"latents": latents.to(DEVICE, torch.bfloat16), "timestep": torch.tensor([500.0], device=DEVICE),
            "prompt": embeddings[0].to(DEVICE)}


def forward(model, inputs: dict) -> torch.Tensor:
    context = text_context(inputs["prompt"])  # 512 zero-padded rows
    with torch.inference_mode():
        return model(hidden_states=inputs["latents"], timestep=inputs["timestep"], encoder_hidden_states=context,
                     return_dict=False)[0].float()


@pytest.fixture(scope="module")
def expected(stock, inputs) -> torch.Tensor:
    return forward(stock, inputs)


@pytest.mark.parametrize("kernel", ["sdpa", pytest.param("flash3", marks=requires_flash3)])
def test_rearranged_forward_matches_the_stock_forward(rearranged, inputs, expected, kernel, monkeypatch):
    set_attention_kernel(rearranged, kernel)
    fa3_calls = []
    fa3 = attention_dispatch.flash_attn_3_func  # diffusers' FA3 backend calls it by this module-level name

    def counted(*args, **kwargs):
        fa3_calls.append(1)
        return fa3(*args, **kwargs)

    monkeypatch.setattr(attention_dispatch, "flash_attn_3_func", counted)
    got = forward(rearranged, inputs)
    # FA3 runs every block's self- and cross-attention (the context is always 512 rows, padding included, as Wan's).
    assert len(fa3_calls) == (2 * rearranged.config.num_layers if kernel == "flash3" else 0)
    assert got.shape == expected.shape
    error = relative_error(got, expected)
    assert error < TOLERANCE, f"{kernel}: rearranged forward differs from the stock one by {error:.2%}"


def rank_16_adapter(model) -> dict[str, torch.Tensor]:
    """Random rank-16 lora_A/lora_B on the self-attention's query/key (permuted rows) and the FFN's
    up-projection (the GELU epilogue) of every block, each delta about twice its weight's spread.

    That large because random weights make the output insensitive: at a tenth of the weights' spread
    this adapter moved one forward by 1.4 %, under the tolerance; at twice, by 17 % (the query/key
    deltas alone by 2.3 %: near-uniform attention). Measured on the CPU in bf16, one latent frame.
    """
    generator = torch.Generator().manual_seed(3)
    state_dict = {}
    for index, block in enumerate(model.blocks):
        for name in ("attn1.to_q", "attn1.to_k", "ffn.net.0.proj"):
            weight = block.get_submodule(name).weight
            up_scale = 2 * weight.float().std().item() / 16**0.5
            state_dict[f"blocks.{index}.{name}.lora_A.weight"] = torch.randn(16, weight.shape[1], generator=generator)
            state_dict[f"blocks.{index}.{name}.lora_B.weight"] = torch.randn(weight.shape[0], 16, generator=generator) * up_scale
    return state_dict


def test_a_merged_lora_on_the_fast_path_gives_the_stock_forward_with_it(stock, rearranged, inputs, expected):
    set_attention_kernel(rearranged, "flash3" if FLASH3_MISSING is None else "sdpa")
    adapter = {"style": (rank_16_adapter(stock), 1.0)}
    served = [ServedAdapters(model, adapter, device=DEVICE) for model in (stock, rearranged)]
    try:
        for adapters in served:
            adapters.use("style", 0.8)
        with_lora = forward(stock, inputs)
        error = relative_error(forward(rearranged, inputs), with_lora)
        assert error < TOLERANCE, f"with a LoRA the fast path differs from the stock forward by {error:.2%}"
        assert relative_error(with_lora, expected) > 5 * TOLERANCE  # the adapter moves the output well past the tolerance
    finally:
        for adapters in served:
            adapters.use(None)
    assert torch.equal(forward(stock, inputs), expected)  # base weights restored bit for bit

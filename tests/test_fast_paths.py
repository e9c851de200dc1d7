"""The GPU speed switches, exercised on the CPU with the tiny demo model: same output, within tolerance."""

import numpy as np
import pytest
import torch

from pipeline.generator import VideoModel
from pipeline.loading import load_text_encoder
from pipeline.params import GenerationParams
from pipeline.text import PromptEncoder

PARAMS = GenerationParams(prompt="a red fox in snow", size="624*624", frame_num=5, sample_steps=2, seed=3)


@pytest.fixture(scope="module")
def embeddings(demo_source):
    tokenizer, model = load_text_encoder(demo_source, torch.device("cpu"), torch.float32)
    encoder = PromptEncoder(tokenizer, model, torch.device("cpu"))
    return encoder.encode([PARAMS.prompt, PARAMS.effective_negative_prompt])


def generate(demo_source, embeddings, vae_dtype=torch.float32, compiled=False) -> np.ndarray:
    model = VideoModel.load(demo_source, torch.device("cpu"), vae_dtype=vae_dtype)
    if compiled:
        model.compile()
    return model.generate(PARAMS, *embeddings).frames.astype(np.float64)


def test_compiled_blocks_match_eager_frames(demo_source, embeddings):
    eager = generate(demo_source, embeddings)
    tuning_before = torch._inductor.config.coordinate_descent_tuning
    compiled = generate(demo_source, embeddings, compiled=True)
    assert compiled.shape == eager.shape
    assert np.abs(compiled - eager).mean() < 0.5  # uint8 levels; fp32 kernels differ only in rounding
    # The tuning goes with our compiled regions, not with every later compile in the replica's process.
    assert torch._inductor.config.coordinate_descent_tuning == tuning_before


def test_bf16_vae_decode_stays_close_to_fp32(demo_source, embeddings):
    fp32 = generate(demo_source, embeddings)
    bf16 = generate(demo_source, embeddings, vae_dtype=torch.bfloat16)
    psnr = 10 * np.log10(255.0**2 / max(((bf16 - fp32) ** 2).mean(), 1e-12))
    assert psnr > 30, psnr


def test_cfg_parallel_copy_gives_the_same_frames(demo_source, embeddings):
    """The unconditional branch on its own device copy (here a second CPU copy, on its own thread)."""
    single = generate(demo_source, embeddings)
    model = VideoModel.load(demo_source, torch.device("cpu"), uncond_device=torch.device("cpu"))
    parallel = model.generate(PARAMS, *embeddings).frames.astype(np.float64)
    # Bit-identical on GPUs (bench); on the CPU a copied weight's memory alignment can change rounding.
    assert np.abs(parallel - single).mean() < 0.5


@pytest.mark.parametrize("kind", ["first_block", "taylorseer"])
def test_step_cache_is_opt_in_and_stays_near_the_exact_output(demo_source, embeddings, kind):
    model = VideoModel.load(demo_source, torch.device("cpu"))
    # Aggressive settings so the tiny random model really reuses cached steps.
    options = {"threshold": 100.0} if kind == "first_block" else {"cache_interval": 2, "disable_cache_before_step": 1}
    model.enable_step_cache(kind, **options)
    params = PARAMS.model_copy(update={"sample_steps": 4})
    cached = model.generate(params, *embeddings).frames.astype(np.float64)
    model_exact = VideoModel.load(demo_source, torch.device("cpu"))
    exact = model_exact.generate(params, *embeddings).frames.astype(np.float64)
    assert cached.shape == exact.shape
    difference = np.abs(cached - exact).mean()
    assert 0 < difference < 40  # engaged (output moved), approximate by design; the GPU bench reports the real figure
    with pytest.raises(ValueError, match="unknown step cache"):
        model.enable_step_cache("magic")
    with pytest.raises(ValueError, match="do not combine"):
        model.compile()


def test_attention_kernel_auto_uses_sdpa_off_hopper_and_flash3_is_never_silent():
    from pipeline.attention import resolve_kernel

    cpu = torch.device("cpu")
    assert resolve_kernel("auto", cpu) == "sdpa"
    assert resolve_kernel("sdpa", cpu) == "sdpa"
    with pytest.raises(RuntimeError, match="flash3 was asked for, but FlashAttention-3 needs a CUDA GPU"):
        resolve_kernel("flash3", cpu)
    with pytest.raises(ValueError, match="attention must be one of auto, sdpa, flash3"):
        resolve_kernel("flash4", cpu)


def test_attention_kernel_is_set_on_every_attention_processor(demo_source, embeddings):
    """The switch reaches each self- and cross-attention of each block, and SDPA keeps the exact output."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    from pipeline.attention import set_attention_kernel

    model = VideoModel.load(demo_source, torch.device("cpu"), attention="sdpa")
    transformer = model.models.transformer
    backends = [m.processor._attention_backend for m in transformer.modules() if hasattr(getattr(m, "processor", None), "_attention_backend")]
    assert len(backends) == 2 * transformer.config.num_layers
    assert set(backends) == {AttentionBackendName.NATIVE}
    set_attention_kernel(transformer, "flash3")  # only labels the processors; FA3 itself needs a Hopper GPU
    assert {m.processor._attention_backend for m in transformer.modules() if hasattr(getattr(m, "processor", None), "_attention_backend")} == {AttentionBackendName._FLASH_3}
    set_attention_kernel(transformer, "sdpa")
    explicit = model.generate(PARAMS, *embeddings).frames
    assert np.array_equal(explicit, VideoModel.load(demo_source, torch.device("cpu")).generate(PARAMS, *embeddings).frames)


def test_generate_writes_the_mp4_while_decoding(demo_source, embeddings, tmp_path):
    from pipeline.video import read_mp4

    model = VideoModel.load(demo_source, torch.device("cpu"))
    phases = []
    result = model.generate(PARAMS, *embeddings, on_progress=lambda phase, *_: phases.append(phase), video_path=tmp_path / "out.mp4")
    assert result.video_path == tmp_path / "out.mp4" and [p.name for p in tmp_path.iterdir()] == ["out.mp4"]
    decoded, meta = read_mp4(result.video_path)
    assert decoded.shape == result.frames.shape and meta["size"] == (PARAMS.width, PARAMS.height)
    assert np.abs(decoded.astype(np.float64) - result.frames).mean() < 12  # H.264 at quality 8
    assert phases[-3:] == ["decode", "decode", "write"] and "mp4_write" in result.timings


def test_a_failure_after_the_decode_leaves_no_partial_mp4(demo_source, embeddings, tmp_path):
    def fail_at_write(phase, *_):
        if phase == "write":
            raise RuntimeError("the caller went away")

    model = VideoModel.load(demo_source, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="went away"):
        model.generate(PARAMS, *embeddings, on_progress=fail_at_write, video_path=tmp_path / "out.mp4")
    assert list(tmp_path.iterdir()) == []


def test_vae_padding_inside_the_convolution_gives_the_same_pixels(demo_source):
    """The faster causal convolution is exact, whole and tiled; channels-last only moves rounding."""
    from pipeline.loading import load_vae
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanUpsample

    from pipeline.vae import CausalConv3dPaddedInKernel, UpsampleInInputDtype, speed_up_decode

    reference, fast = load_vae(demo_source, torch.float32), load_vae(demo_source, torch.float32)
    speed_up_decode(fast, channels_last=False)
    assert {type(m) for m in fast.modules()} >= {CausalConv3dPaddedInKernel}
    latents = torch.randn(1, 16, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    expected = reference.decode(latents).sample
    assert torch.equal(fast.decode(latents).sample, expected)
    for vae in (reference, fast):
        vae.enable_tiling(tile_sample_min_height=64, tile_sample_min_width=64, tile_sample_stride_height=48, tile_sample_stride_width=48)
    assert torch.equal(fast.decode(latents).sample, reference.decode(latents).sample)
    fast.disable_tiling()
    speed_up_decode(fast, channels_last=True)
    assert (fast.decode(latents).sample - expected).abs().max() < 1e-4

    # Upsampling in bf16 instead of float32 and back: nearest-neighbour only copies, so equal.
    upsamplers = [m for m in fast.modules() if isinstance(m, UpsampleInInputDtype)]
    assert len(upsamplers) == len(fast.config.dim_mult) - 1  # one per decoder stage that doubles H and W
    x = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    assert torch.equal(upsamplers[0](x), WanUpsample.forward(upsamplers[0], x))


def test_compiled_cfg_parallel_compiles_one_branch_at_a_time(demo_source, embeddings):
    """Dynamo cannot compile on two threads at once: the first generation at a shape runs the branches in turn."""
    model = VideoModel.load(demo_source, torch.device("cpu"), uncond_device=torch.device("cpu"))
    model.compile()
    shape = (PARAMS.frame_num, PARAMS.height, PARAMS.width)
    assert shape not in model._compiled_shapes
    first = model.generate(PARAMS, *embeddings).frames.astype(np.float64)
    assert shape in model._compiled_shapes  # later generations at this shape run the branches in parallel
    second = model.generate(PARAMS, *embeddings).frames.astype(np.float64)
    assert np.abs(second - first).mean() < 0.5
    assert np.abs(first - generate(demo_source, embeddings, compiled=True)).mean() < 0.5


def test_rearranged_dit_computes_the_same_function(demo_source):
    """GELU in the up-projection's op, (evens, odds) RoPE heads: same outputs, every block converted."""
    import copy

    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    from pipeline.dit import (GeluInEpilogue, HalvesRopeProcessor, SharedSelfAttentionProcessor, linear_gelu_tanh,
                              rearrange_blocks, text_context)
    from pipeline.loading import load_transformer
    from pipeline.text import MAX_TEXT_TOKENS

    reference = load_transformer(demo_source, torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # norm weights of ones and zero biases would hide a missed permutation
        for parameter in reference.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    rearranged = copy.deepcopy(reference)
    rearrange_blocks(rearranged)
    blocks = reference.config.num_layers
    assert sum(type(m) is GeluInEpilogue for m in rearranged.modules()) == blocks
    processors = [type(block.attn1.processor) for block in rearranged.blocks] + [type(block.attn2.processor) for block in rearranged.blocks]
    # Block 0's self-attention (a subclass) can serve both guidance passes; cross-attention has no RoPE.
    assert processors == [SharedSelfAttentionProcessor] + [HalvesRopeProcessor] * (blocks - 1) + [WanAttnProcessor] * blocks
    # Short and full prompts: 512 real tokens leave no padding.
    for n_tokens in (6, MAX_TEXT_TOKENS):
        embeds = torch.randn(n_tokens, reference.config.text_dim, generator=generator)
        assert text_context(embeds).shape == (1, MAX_TEXT_TOKENS, reference.config.text_dim)
        inputs = {"hidden_states": torch.randn(1, 16, 3, 8, 8, generator=generator), "timestep": torch.tensor([700.0]), "return_dict": False}
        with torch.inference_mode():
            expected = reference(**inputs, encoder_hidden_states=text_context(embeds))[0]
            got = rearranged(**inputs, encoder_hidden_states=text_context(embeds))[0]
        assert (got - expected).abs().max() < 1e-5 * expected.abs().max(), n_tokens
    assert not torch.equal(rearranged.blocks[0].attn1.to_q.weight, reference.blocks[0].attn1.to_q.weight)  # really permuted

    x, weight, bias = (torch.randn(shape, generator=generator) for shape in ((2, 5, 8), (12, 8), (12,)))
    assert torch.equal(linear_gelu_tanh(x, weight, bias), torch.nn.functional.gelu(x @ weight.T + bias, approximate="tanh"))


def test_video_model_runs_the_fused_dit_and_refuses_what_it_cannot_rearrange(demo_source):
    from pipeline.dit import GeluInEpilogue, deinterleave_rope
    from pipeline.loading import load_transformer

    model = VideoModel.load(demo_source, torch.device("cpu"), uncond_device=torch.device("cpu"))
    for transformer in (model.models.transformer, model.uncond_transformer):
        assert any(type(m) is GeluInEpilogue for m in transformer.modules())
    fused_qkv = load_transformer(demo_source, torch.float32)
    fused_qkv.fuse_qkv_projections()
    with pytest.raises(ValueError, match="separate q/k/v projections"):
        deinterleave_rope(fused_qkv)


def test_block_zero_self_attention_is_computed_once_per_guidance_step(demo_source):
    """The second pass of a guidance step reuses the first one's block-0 self-attention: bit-identical latents."""
    from pipeline.dit import HalvesRopeProcessor, SharedSelfAttentionProcessor, rearrange_blocks, text_context
    from pipeline.loading import load_transformer
    from pipeline.sampler import DenoiseRequest, denoise

    shared = load_transformer(demo_source, torch.float32)
    rearrange_blocks(shared)
    assert type(shared.blocks[0].attn1.processor) is SharedSelfAttentionProcessor
    assert all(type(block.attn1.processor) is HalvesRopeProcessor for block in shared.blocks[1:])
    unshared = load_transformer(demo_source, torch.float32)
    rearrange_blocks(unshared)
    unshared.blocks[0].attn1.processor.__class__ = HalvesRopeProcessor

    text = torch.randn(20, shared.config.text_dim, generator=torch.Generator().manual_seed(0))
    request = DenoiseRequest(context=text_context(text[:6]), negative_context=text_context(text[6:]),
                             frame_num=5, height=32, width=32, steps=3, shift=8.0, guide_scale=6.0, seed=0)
    latents, query_projections = {}, {}
    for name, transformer in (("shared", shared), ("unshared", unshared)):
        calls = []
        hook = transformer.blocks[0].attn1.to_q.register_forward_hook(lambda *_: calls.append(1))
        latents[name] = denoise(transformer, request, torch.device("cpu"))
        hook.remove()
        query_projections[name] = len(calls)
    assert query_projections == {"shared": 3, "unshared": 6}  # one block-0 self-attention per step, not two
    assert torch.equal(latents["shared"], latents["unshared"])
    assert shared.blocks[0].attn1.processor.kept is None  # nothing held between steps


def test_compiled_model_compiles_nothing_more_for_new_prompt_lengths_or_guidance_off(demo_source):
    """After the replica's warm-up, no request pays for compilation: the context's length is a dynamic size."""
    from torch._dynamo.utils import counters

    model = VideoModel.load(demo_source, torch.device("cpu"))
    model.compile(PARAMS)
    graphs = counters["stats"]["unique_graphs"]
    embeds = torch.randn(512, model.text_dim, generator=torch.Generator().manual_seed(0))
    for n_prompt, n_negative, guide_scale in ((5, 39, 6.0), (17, 250, 6.0), (512, 2, 1.0)):
        params = PARAMS.model_copy(update={"sample_guide_scale": guide_scale})
        model.generate(params, embeds[:n_prompt], embeds[:n_negative])
    assert counters["stats"]["unique_graphs"] == graphs


def test_loading_the_video_model_leaves_later_models_with_real_weights(demo_source):
    """diffusers builds models inside accelerate's init_empty_weights, a process-wide swap of
    register_parameter: loading the DiT and the VAE in two threads once left it in place, and a text
    encoder loaded afterwards had meta weights ("Cannot copy out of meta tensor")."""
    VideoModel.load(demo_source, torch.device("cpu"))
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"
    _, model = load_text_encoder(demo_source, torch.device("cpu"), torch.float32)
    assert all(parameter.device.type == "cpu" for parameter in model.parameters())

"""Where one DiT forward and one VAE decode spend their GPU time, and what candidate settings change.

Full-size random weights, as in bench/gpu.py. For each DiT variant: seconds per forward at the
832x480x81 shape (mean of 5 after warm-up), the warm-up (compile) seconds, GPU kernel time by
family (torch.profiler), the top kernels, and the output's relative difference from the first
variant's. For each VAE variant: the bf16 decode by latent frame as the pipeline runs it, the same
breakdown, and the largest pixel difference from the first variant run. `cfg`: one guidance step's two forwards on
one GPU, in turn or on two CUDA streams. `loop`: the sampler loop as VideoModel runs it (FA3, compiled):
seconds per step, then one traced run's GPU idle time and its longest gaps with the CPU work going
on. `sustained`: the DiT's big GEMM and FA3 self-attention held for 20 s, TFLOP/s per second (an H100
SXM holds 700 W by lowering its clock). `conv`: the VAE's costliest convolution computed other ways.
`vae_ops`: the decode's GPU time by aten op and shape. `cross`: cross-attention over the prompt's
512 padded rows or over its real tokens plus padding as a logit bias (pipeline/dit.py), by kernel.

Writes `<out>/profile-<device>-<date>[-tag].json` and `.md` after every variant, so a run cut short
keeps what it measured.

Usage (on the GPU machine): python bench/profile_gpu.py [--out DIR] [--tag T] [kernels | dit | vae | cfg | loop | cross | ... | dit:VARIANT ...]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import re
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu import DEVICE, build_dit, build_vae, relative_error, reset_memory, synced  # noqa: E402

from pipeline.attention import set_attention_kernel  # noqa: E402
from pipeline.diffusers_compat import replace_processor  # noqa: E402
from pipeline.dit import HalvesRopeProcessor, linear_gelu_tanh, rearrange_blocks, rotate_halves, text_context  # noqa: E402
from pipeline.generator import VideoModel  # noqa: E402
from pipeline.sampler import DenoiseRequest, denoise  # noqa: E402
from pipeline.torch_compat import set_inductor_options  # noqa: E402
from pipeline.vae import channels_last_weights, compile_norms, pad_inside_convolutions, speed_up_decode  # noqa: E402
from pipeline.video import decode_latents  # noqa: E402

# Kernel families by name fragment, first match wins (Inductor's names carry the ops they fused, so
# they go first; cuDNN convolutions are implicit GEMMs, so conv goes before gemm).
FAMILIES = (
    ("gemm", ("triton_tem",)),
    ("fused_triton", ("triton_",)),
    ("layout", ("nchwtonhwc", "nhwctonchw")),
    ("attention", ("flash", "fmha", "sdpa", "attention")),
    ("conv", ("fprop", "conv", "implicit_convolve", "winograd")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "triton_tem", "cublas", "matmul")),
    ("copy", ("memcpy", "memset", "copy")),
)


def family(kernel: str) -> str:
    name = kernel.lower()
    return next((label for label, parts in FAMILIES if any(part in name for part in parts)), "other_eager")


def kernel_profile(fn, repeats: int = 2) -> dict:
    """GPU time per call by kernel family, plus the ten costliest kernels (ms per call)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    by_family, by_kernel = defaultdict(float), defaultdict(float)
    for event in prof.key_averages():
        micros = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if micros <= 0:
            continue
        by_family[family(event.key)] += micros / 1000 / repeats
        by_kernel[event.key[:90]] += micros / 1000 / repeats
    top = sorted(by_kernel.items(), key=lambda item: -item[1])[:10]
    return {
        "gpu_ms_total": round(sum(by_family.values()), 1),
        "gpu_ms_by_family": {k: round(v, 1) for k, v in sorted(by_family.items(), key=lambda item: -item[1])},
        "top_kernels_ms": [[name, round(ms, 2)] for name, ms in top],
    }


# DiT variant -> (changes made to diffusers' bf16 DiT before compiling, torch.compile mode or None for eager, inductor options)
def fuse_qkv(model) -> None:
    model.fuse_qkv_projections()


DIT_VARIANTS = {
    "fa3_compiled": ((), "default", {}),
    "fa3_compiled_fused_qkv": ((fuse_qkv,), "default", {}),
    "fa3_autotune_fused_qkv": ((fuse_qkv,), "max-autotune-no-cudagraphs", {}),
    # coordinate-descent tuning of the fused elementwise kernels
    "fa3_compiled_cd": ((), "default", {"coordinate_descent_tuning": True}),
    # GELU in the up-projection's epilogue and (evens, odds) RoPE heads (pipeline/dit.py)
    "fa3_compiled_cd_rearranged": ((rearrange_blocks,), "default", {"coordinate_descent_tuning": True}),
}
def cudnn_benchmark(_vae) -> None:
    """cuDNN times its algorithms for each new convolution shape instead of going by heuristics."""
    torch.backends.cudnn.benchmark = True


# VAE variant -> what is done to diffusers' bf16 VAE before decoding (pipeline/vae.py)
VAE_VARIANTS = {
    "eager": (),
    "compiled_norms": (compile_norms,),
    "channels_last": (channels_last_weights,),
    "channels_last_implicit_pad": (pad_inside_convolutions, channels_last_weights),
    "channels_last_implicit_pad_compiled_norms": (pad_inside_convolutions, channels_last_weights, compile_norms),
    # + nearest upsampling in bf16 (pipeline/vae.py): what VideoModel runs
    "fast": (partial(speed_up_decode, channels_last=True), compile_norms),
    "fast_cudnn_benchmark": (partial(speed_up_decode, channels_last=True), compile_norms, cudnn_benchmark),
}


# How one guidance step runs its two forwards on one GPU: one after the other, or concurrently from
# two threads on two CUDA streams (each forward's kernel tails can fill with the other's kernels).
CFG_VARIANTS = ("sequential", "two_streams")

# The sampler loop of a compiled VideoModel. (A run on 2026-11-26 also replayed each forward from a
# CUDA graph: 0.8942 against 0.8953 s per step, because the GPU idles only 0.8 % of the loop. Not kept.)
# `unshared`: block 0's self-attention computed by both passes of a guidance step, as before
# `SharedSelfAttentionProcessor`.
LOOP_VARIANTS = ("compiled", "unshared")
LOOP_STEPS = 10

# Held for SUSTAIN_S seconds, as the 100 forwards of a video hold them: the DiT's FFN up-projection GEMM
# and its FA3 self-attention. An H100 SXM caps its power at 700 W and lowers its clock to stay there.
SUSTAINED = ("ffn_gemm", "fa3_self_attention")
SUSTAIN_S = 20.0

# Cross-attention of 32,760 video tokens over a 40-token prompt. diffusers pads the text to 512 tokens;
# the 472 padding rows are equal, so their keys and values are too, and attention over them equals
# attention over one of them with log(472) added to its logit. `<kernel>_<keys>`: fa3 over the 512
# keys (the reference), fa3 over the first 41 (a lower bound, not the same function), then one
# padding key with that bias through SDPA's default choice, its efficient or cuDNN kernel, or a
# compiled flex_attention (bias added in fp32).
CROSS_VARIANTS = ("fa3_512", "fa3_41", "cudnn_512", "sdpa_41", "efficient_41", "cudnn_41", "flex_41", "math_41")
CROSS_REAL_TOKENS = 40

# The VAE's full-resolution 96-channel 3x3x3 convolution (four output frames after two cached ones),
# computed four ways: cuDNN conv3d; conv3d with the output channels zero-padded to 128 (then sliced);
# three cuDNN conv2d over time-shifted frames, summed in bf16; one conv2d over the three frames stacked
# as channels (one fp32 accumulation, like conv3d's).
CONV_VARIANTS = ("conv3d", "conv3d_out128", "conv2d_sum", "conv2d_stacked")


class Profiler:
    def __init__(self, out: Path, tag: str):
        self.out = out
        self.tag = tag
        self.results: dict = {
            "device": torch.cuda.get_device_name(0),
            "date": datetime.date.today().isoformat(),
            "torch": torch.__version__,
            "shape": "832x480x81 (32,760 DiT tokens), batch 1, bf16 DiT, FlashAttention-3",
            "dit": {},
            "vae": {},
            "kernels": {},
            "cfg": {},
            "loop": {},
            "sustained": {},
            "conv": {},
            "cross": {},
            "vae_ops": {},
        }
        generator = torch.Generator().manual_seed(0)
        self.latents = torch.randn(1, 16, 21, 60, 104, generator=generator).to(DEVICE)
        # Real-token embeddings of a 40-token prompt and a 120-token negative prompt, as the text stage returns them.
        self.prompt, self.negative_prompt = (torch.randn(160, 4096, generator=generator) * 0.1).to(DEVICE, torch.bfloat16).split([40, 120])
        self.timestep = torch.tensor([500.0], device=DEVICE)
        self.dit_reference: torch.Tensor | None = None
        self.cfg_model = None
        self.cfg_reference = None
        self.vae_reference = None
        self.references: dict[str, torch.Tensor] = {}  # section -> its first variant's output

    def save(self) -> None:
        slug = re.sub(r"[^a-z0-9]+", "-", self.results["device"].lower()).strip("-")
        stem = self.out / f"profile-{slug}-{self.results['date']}{self.tag and '-' + self.tag}"
        stem.with_suffix(".json").write_text(json.dumps(self.results, indent=1))
        stem.with_suffix(".md").write_text(markdown(self.results))

    def dit(self, name: str) -> dict:
        changes, mode, inductor = DIT_VARIANTS[name]
        torch.compiler.reset()
        replaced = set_inductor_options(inductor)
        model = build_dit()
        set_attention_kernel(model, "flash3")
        for change in changes:
            change(model)
        if mode is not None:
            model.compile_repeated_blocks(fullgraph=True, mode=mode)
        hidden, context = self.latents.to(torch.bfloat16), text_context(self.prompt)

        @torch.inference_mode()
        def forward():
            return model(hidden_states=hidden, timestep=self.timestep, encoder_hidden_states=context, return_dict=False)[0]

        output, warmup_s = synced(forward)
        forward()
        seconds = [synced(forward)[1] for _ in range(5)]
        run = {"changes": [change.__name__ for change in changes], "compile_mode": mode, "inductor": inductor, "warmup_s": round(warmup_s, 1),
               "forward_s": round(sum(seconds) / len(seconds), 4), "forward_s_min": round(min(seconds), 4)}
        if self.dit_reference is None:
            self.dit_reference = output.float()
        else:
            run["output_rel_diff_vs_first"] = relative_error(output.float(), self.dit_reference)
        run.update(kernel_profile(forward))
        set_inductor_options(replaced)
        del model
        return run

    def vae(self, name: str) -> dict:
        torch.compiler.reset()
        torch.backends.cudnn.benchmark = False
        vae = build_vae(torch.bfloat16)
        for change in VAE_VARIANTS[name]:
            change(vae)
        def decode():
            return decode_latents(vae, self.latents, lambda _: None)

        frames, warmup_s = synced(decode)
        seconds = [synced(decode)[1] for _ in range(2)]
        run = {"warmup_s": round(warmup_s, 1), "decode_s": round(min(seconds), 3), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        if self.vae_reference is None:
            self.vae_reference = frames
        else:
            run["max_px_diff_vs_first"] = int(np.abs(frames.astype(int) - self.vae_reference).max())
            run["mean_px_diff_vs_first"] = round(float(np.abs(frames.astype(int) - self.vae_reference).mean()), 4)
        run.update(kernel_profile(decode, repeats=1))
        del vae
        return run

    def kernels(self, name: str) -> dict:
        return kernels()

    def cfg(self, name: str) -> dict:
        """One guidance step (conditional + unconditional forward) on one GPU: in turn, or on two streams."""
        if self.cfg_model is None:
            torch.compiler.reset()
            set_inductor_options({"coordinate_descent_tuning": True})
            self.cfg_model = build_dit()
            set_attention_kernel(self.cfg_model, "flash3")
            rearrange_blocks(self.cfg_model)
            self.cfg_model.compile_repeated_blocks(fullgraph=True)
        model, hidden = self.cfg_model, self.latents.to(torch.bfloat16)
        positive, negative = text_context(self.prompt), text_context(self.negative_prompt)

        @torch.inference_mode()
        def forward(context):
            return model(hidden_states=hidden, timestep=self.timestep, encoder_hidden_states=context, return_dict=False)[0]

        side_stream = torch.cuda.Stream()
        side_thread = ThreadPoolExecutor(max_workers=1)

        def on_side_stream():
            with torch.cuda.stream(side_stream):
                return forward(negative)

        def step():
            if name == "sequential":
                return forward(positive), forward(negative)
            side_stream.wait_stream(torch.cuda.current_stream())
            uncond = side_thread.submit(on_side_stream)
            cond = forward(positive)
            result = uncond.result()
            torch.cuda.current_stream().wait_stream(side_stream)
            return cond, result

        (cond, uncond), warmup_s = synced(step)
        step()
        seconds = [synced(step)[1] for _ in range(4)]
        side_thread.shutdown()
        run = {"warmup_s": round(warmup_s, 1), "step_s": round(sum(seconds) / len(seconds), 4), "step_s_min": round(min(seconds), 4)}
        if self.cfg_reference is None:
            self.cfg_reference = (cond.float(), uncond.float())
        else:
            run["rel_diff_vs_first"] = max(relative_error(a.float(), b) for a, b in zip((cond, uncond), self.cfg_reference))
        return run

    def loop(self, name: str) -> dict:
        """LOOP_STEPS guidance steps at 832x480x81 through `denoise`, as VideoModel.generate runs them."""
        torch.compiler.reset()
        model = VideoModel(build_dit(), build_vae(torch.bfloat16), DEVICE, attention="flash3")
        if name == "unshared":
            replace_processor(model.models.transformer.blocks[0].attn1, HalvesRopeProcessor())
        model.compile()
        transformer = model.models.transformer
        request = DenoiseRequest(context=text_context(self.prompt), negative_context=text_context(self.negative_prompt),
                                 frame_num=81, height=480, width=832, steps=LOOP_STEPS, shift=8.0, guide_scale=6.0, seed=42)

        def sample(steps: int) -> torch.Tensor:
            return denoise(transformer, dataclasses.replace(request, steps=steps), DEVICE)

        reset_memory()
        _, warmup_s = synced(lambda: sample(2))  # compiles
        latents, seconds = synced(lambda: sample(LOOP_STEPS))
        run = {"warmup_s": round(warmup_s, 1), "step_s": round(seconds / LOOP_STEPS, 4), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        run.update(self.compared_with_first("loop", name, latents))
        run.update(idle_gaps(lambda: sample(3)))
        return run

    def sustained(self, name: str) -> dict:
        """TFLOP/s in one-second windows over SUSTAIN_S seconds of back-to-back work."""
        bf16 = {"device": DEVICE, "dtype": torch.bfloat16}
        tokens, heads, dim = 32760, 12, 128
        if name == "ffn_gemm":
            x, weight = torch.randn(tokens, 1536, **bf16), torch.randn(1536, 8960, **bf16) * 0.02
            work, flop = (lambda: x @ weight), 2 * tokens * 1536 * 8960
        else:
            from pipeline.attention import flash3_function

            fa3 = flash3_function()
            q, k, v = (torch.randn(1, tokens, heads, dim, **bf16) for _ in range(3))
            work, flop = (lambda: fa3(q, k, v)), 4 * tokens * tokens * heads * dim
        per_call_ms = time_ms(work, repeats=10)
        calls = max(1, int(1000 / per_call_ms))
        windows, started = [], time.perf_counter()
        while time.perf_counter() - started < SUSTAIN_S:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(calls):
                work()
            end.record()
            end.synchronize()
            windows.append(round(calls * flop / (begin.elapsed_time(end) / 1000) / 1e12, 1))
        return {"burst_tflops": round(flop / (per_call_ms / 1000) / 1e12, 1), "tflops_by_second": windows,
                "sustained_tflops": round(sum(windows[-5:]) / len(windows[-5:]), 1)}

    @torch.inference_mode()
    def cross(self, name: str) -> dict:
        """One cross-attention at the DiT's shape (see CROSS_VARIANTS), its difference from fa3 over 512 keys."""
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.attention.flex_attention import flex_attention

        from pipeline.attention import flash3_function

        kernel, keys = name.rsplit("_", 1)
        generator = torch.Generator().manual_seed(0)
        tokens, heads, dim, real = 32760, 12, 128, CROSS_REAL_TOKENS
        q, k_real, v_real, k_pad, v_pad = (torch.randn(1, n, heads, dim, generator=generator).to(DEVICE, torch.bfloat16)
                                           for n in (tokens, real, real, 1, 1))
        k_full = torch.cat([k_real, k_pad.expand(1, 512 - real, heads, dim)], dim=1)
        v_full = torch.cat([v_real, v_pad.expand(1, 512 - real, heads, dim)], dim=1)
        fa3 = flash3_function()
        if kernel == "fa3":
            return self.cross_run(name, lambda: fa3(q, k_full[:, :int(keys)], v_full[:, :int(keys)]))
        qt = q.transpose(1, 2)
        if keys == "512":
            k, v, bias = k_full.transpose(1, 2), v_full.transpose(1, 2), torch.zeros(512, device=DEVICE)
        else:
            k, v = (torch.cat([x_real, x_pad], dim=1).transpose(1, 2) for x_real, x_pad in ((k_real, k_pad), (v_real, v_pad)))
            bias = torch.zeros(real + 1, device=DEVICE)
            bias[-1] = float(np.log(512 - real))
        if kernel == "flex":
            compiled = torch.compile(flex_attention, fullgraph=True)
            return self.cross_run(name, lambda: compiled(qt, k, v, score_mod=lambda score, b, h, q_idx, kv_idx: score + bias[kv_idx]).transpose(1, 2))
        if kernel == "math":
            def attend(qt, k, v):
                scores = (qt @ k.transpose(-1, -2)).float() * dim**-0.5 + bias
                return (scores.softmax(dim=-1).to(v.dtype) @ v).transpose(1, 2)

            return self.cross_run(name, partial(torch.compile(attend, fullgraph=True), qt, k, v))
        mask = bias.to(torch.bfloat16)[None, None, None, :] if keys != "512" else None
        backend = {"efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}.get(kernel)

        def work():
            with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                return F.scaled_dot_product_attention(qt, k, v, attn_mask=mask).transpose(1, 2)

        return self.cross_run(name, work)

    def cross_run(self, name: str, work) -> dict:
        output = work()
        run = {"ms": time_ms(work, repeats=20)}
        run.update(self.compared_with_first("cross", name, output[0] if isinstance(output, tuple) else output))
        run.update(kernel_profile(work, repeats=2))
        return run

    def compared_with_first(self, section: str, name: str, output: torch.Tensor) -> dict:
        """The relative difference of `output` from the section's first variant's (which becomes the reference)."""
        first = {"cross": CROSS_VARIANTS, "conv": CONV_VARIANTS, "loop": LOOP_VARIANTS}[section][0]
        if name == first:
            self.references[section] = output.float()
            return {}
        return {f"rel_diff_vs_{first}": relative_error(output.float(), self.references[section])}

    def conv(self, name: str) -> dict:
        """One VAE convolution at its full-resolution shape (see CONV_VARIANTS); output difference from conv3d."""
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(1, 96, 6, 480, 832, generator=generator).to(DEVICE, torch.bfloat16).to(memory_format=torch.channels_last_3d)
        weight = (torch.randn(96, 96, 3, 3, 3, generator=generator) * 0.02).to(DEVICE, torch.bfloat16).to(memory_format=torch.channels_last_3d)
        bias = torch.randn(96, generator=generator).to(DEVICE, torch.bfloat16)
        if name == "conv3d":
            work = lambda: F.conv3d(x, weight, bias, padding=(0, 1, 1))  # noqa: E731
        elif name == "conv3d_out128":
            weight128 = torch.cat([weight, weight.new_zeros(32, 96, 3, 3, 3)]).to(memory_format=torch.channels_last_3d)
            bias128 = torch.cat([bias, bias.new_zeros(32)])
            work = lambda: F.conv3d(x, weight128, bias128, padding=(0, 1, 1))[:, :96].contiguous(memory_format=torch.channels_last_3d)  # noqa: E731
        elif name == "conv2d_stacked":
            frames = x[0].transpose(0, 1)  # [6, 96, H, W], channels-last strides: a view
            stacked_weight = weight.permute(0, 2, 1, 3, 4).reshape(96, 288, 3, 3).contiguous(memory_format=torch.channels_last)

            def work():
                stacked = torch.cat([frames[dt:dt + 4] for dt in range(3)], dim=1)  # [4, 288, H, W]
                return F.conv2d(stacked, stacked_weight, bias, padding=1).transpose(0, 1).unsqueeze(0)
        else:
            frames = x[0].transpose(0, 1)  # [6, 96, H, W], channels-last strides: a view
            slices = [weight[:, :, dt].contiguous(memory_format=torch.channels_last) for dt in range(3)]

            def work():
                out = F.conv2d(frames[0:4], slices[0], bias, padding=1)
                out = out + F.conv2d(frames[1:5], slices[1], None, padding=1)
                out = out + F.conv2d(frames[2:6], slices[2], None, padding=1)
                return out.transpose(0, 1).unsqueeze(0)
        output = work()
        run = {"ms": time_ms(work, repeats=10), "output_strides": list(output.stride())}
        run.update(self.compared_with_first("conv", name, output))
        run.update(kernel_profile(work, repeats=1))
        return run

    def vae_ops(self, name: str) -> dict:
        """The bf16 decode as VideoModel runs it: GPU time by aten op and input shapes (top 25)."""
        from torch.profiler import ProfilerActivity, profile

        torch.compiler.reset()
        vae = build_vae(torch.bfloat16)
        speed_up_decode(vae, channels_last=True)
        compile_norms(vae)

        def decode():
            return decode_latents(vae, self.latents, lambda _: None)

        _, warmup_s = synced(decode)
        _, decode_s = synced(decode)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            decode()
            torch.cuda.synchronize()
        rows = [e for e in prof.key_averages(group_by_input_shape=True) if e.key.startswith("aten::")]
        rows.sort(key=lambda e: -e.self_device_time_total)
        return {"decode_s": round(decode_s, 3), "warmup_s": round(warmup_s, 1),
                "ops": [[e.key, str(e.input_shapes)[:160], round(e.self_device_time_total / 1000, 1), e.count] for e in rows[:25]]}

    def run(self, section: str, name: str) -> None:
        print(f"== {section}:{name}", flush=True)
        reset_memory()
        started = time.perf_counter()
        try:
            result = getattr(self, section)(name)
        except Exception as error:  # noqa: BLE001 - record and go on with the other variants
            import traceback

            traceback.print_exc()
            result = {"error": repr(error)[:500]}
        result["wall_s"] = round(time.perf_counter() - started, 1)
        self.results[section][name] = result
        print(json.dumps(result), flush=True)
        self.save()


def idle_gaps(fn, top: int = 12) -> dict:
    """Run `fn` under the profiler (CPU and GPU): the GPU's busy and idle time, and the longest idle gaps."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.events()
    kernels = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA)
    cpu_ops = [e for e in events if e.device_type == DeviceType.CPU]
    busy, gaps, end = 0.0, [], kernels[0][0]
    for start, stop in kernels:
        if start > end:
            gaps.append((start - end, end))
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    wall = end - kernels[0][0]

    def during(moment: float) -> list[str]:
        """What the CPU was doing at `moment`, innermost first."""
        ops = sorted((e for e in cpu_ops if e.time_range.start <= moment <= e.time_range.end), key=lambda e: e.time_range.elapsed_us())
        return [e.name[:60] for e in ops[:5]]

    gaps.sort(reverse=True)
    return {
        "traced_gpu_wall_ms": round(wall / 1000, 1),
        "traced_gpu_busy_ms": round(busy / 1000, 1),
        "traced_gpu_idle_ms": round((wall - busy) / 1000, 1),
        "kernels": len(kernels),
        "gaps_over_20us": sum(1 for gap, _ in gaps if gap > 20),
        "idle_in_gaps_over_20us_ms": round(sum(gap for gap, _ in gaps if gap > 20) / 1000, 1),
        "longest_gaps": [[round(gap / 1000, 2), during(at)] for gap, at in gaps[:top]],
    }


def time_ms(fn, repeats: int = 20) -> float:
    fn()
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) / repeats, 3)


@torch.inference_mode()
def kernels() -> dict:
    """Single operations at the DiT's shapes: attention kernels, FFN GELU epilogue, RMS norm + RoPE."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pipeline.attention import flash3_function

    out = {}
    tokens, text, heads, dim = 32760, 512, 12, 128
    bf16 = {"device": DEVICE, "dtype": torch.bfloat16}
    q = torch.randn(1, tokens, heads, dim, **bf16)
    kv_text = torch.randn(1, text, heads, dim, **bf16)
    fa3 = flash3_function()
    out["fa3_self_ms"] = time_ms(lambda: fa3(q, q, q))
    k, v = torch.randn_like(q), torch.randn_like(q)
    out["fa3_self_distinct_qkv_ms"] = time_ms(lambda: fa3(q, k, v))
    out["fa3_cross_ms"] = time_ms(lambda: fa3(q, kv_text, kv_text))
    qt, kt = q.transpose(1, 2), kv_text.transpose(1, 2)
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash2", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                out[f"sdpa_{name}_cross_ms"] = time_ms(lambda: F.scaled_dot_product_attention(qt, kt, kt))
        except RuntimeError as error:
            out[f"sdpa_{name}_cross_ms"] = repr(error)[:120]

    x = torch.randn(tokens, 1536, **bf16)
    weight, bias = torch.randn(8960, 1536, **bf16) * 0.02, torch.randn(8960, **bf16) * 0.02
    reference = F.gelu(F.linear(x, weight, bias).float(), approximate="tanh")
    out["ffn_up_linear_then_gelu_ms"] = time_ms(lambda: F.gelu(F.linear(x, weight, bias), approximate="tanh"))
    out["ffn_up_linear_only_ms"] = time_ms(lambda: F.linear(x, weight, bias))
    out["ffn_up_gelu_epilogue_ms"] = time_ms(lambda: linear_gelu_tanh(x, weight, bias))  # cuBLASLt GELU epilogue
    out["ffn_up_gelu_epilogue_rel_diff"] = relative_error(linear_gelu_tanh(x, weight, bias).float(), reference)
    out["ffn_up_linear_then_gelu_rel_diff"] = relative_error(F.gelu(F.linear(x, weight, bias), approximate="tanh").float(), reference)

    norm = torch.nn.RMSNorm(1536, eps=1e-6, **bf16)
    cos, sin = torch.randn(1, tokens, 1, dim, device=DEVICE), torch.randn(1, tokens, 1, dim, device=DEVICE)

    def rope_diffusers(h):
        x1, x2 = h.unflatten(-1, (-1, 2)).unbind(-1)
        c, s = cos[..., 0::2], sin[..., 1::2]
        rotated = torch.empty_like(h)
        rotated[..., 0::2] = x1 * c - x2 * s
        rotated[..., 1::2] = x1 * s + x2 * c
        return rotated.type_as(h)

    def rope_stacked(h):
        x1, x2 = h.unflatten(-1, (-1, 2)).unbind(-1)
        c, s = cos[..., 0::2], sin[..., 1::2]
        return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2).type_as(h)

    def rope_halves(h):  # pipeline/dit.py: heads stored (evens, odds)
        return rotate_halves(h, cos[..., 0::2], sin[..., 1::2])

    qk = torch.randn(1, tokens, 1536, **bf16)
    order = (torch.arange(heads)[:, None] * dim + torch.cat([torch.arange(0, dim, 2), torch.arange(1, dim, 2)])).flatten()
    for name, rope, h in (("diffusers", rope_diffusers, qk), ("stacked", rope_stacked, qk), ("halves", rope_halves, qk[..., order.to(DEVICE)].contiguous())):
        torch.compiler.reset()
        step = torch.compile(lambda h, rope=rope: rope(norm(h).unflatten(2, (heads, -1))), fullgraph=True)
        out[f"norm_rope_{name}_compiled_ms"] = time_ms(lambda: step(h))
        out[f"norm_rope_{name}_output"] = step(h)
    out["norm_rope_halves_output"] = out["norm_rope_halves_output"].flatten(2)[..., order.argsort().to(DEVICE)].unflatten(2, (heads, -1))
    reference = out.pop("norm_rope_diffusers_output").float()
    for name in ("stacked", "halves"):
        out[f"norm_rope_{name}_rel_diff"] = relative_error(out.pop(f"norm_rope_{name}_output").float(), reference)
    return out


def markdown(results: dict) -> str:
    lines = [f"# GPU profile — {results['device']}, {results['date']}", "", f"torch {results['torch']}; {results['shape']}.", ""]
    if "note" in results:
        lines += [results["note"], ""]
    families = ("attention", "gemm", "conv", "fused_triton", "other_eager", "copy", "layout")
    for section, unit in (("dit", "forward_s"), ("vae", "decode_s")):
        runs = {k: v for k, v in results[section].items() if unit in v}
        if not runs:
            continue
        lines += [f"| {section} variant | {unit} | warm-up s | GPU ms | " + " | ".join(families) + " | difference |",
                  "| --- " * (5 + len(families)) + "|"]
        for name, run in runs.items():
            split = run["gpu_ms_by_family"]
            diff = next((run[key] for key in ("output_rel_diff_vs_first", "max_px_diff_vs_first", "max_px_diff_vs_eager") if key in run), "—")
            lines.append(f"| {name} | {run[unit]} | {run['warmup_s']} | {run['gpu_ms_total']} | "
                         + " | ".join(str(split.get(f, 0)) for f in families) + f" | {diff} |")
        lines.append("")
    steps = {k: v for k, v in results.get("cfg", {}).items() if "step_s" in v}
    if steps:
        lines += ["| guidance step on one GPU | step_s | min | warm-up s | difference |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {name} | {run['step_s']} | {run['step_s_min']} | {run['warmup_s']} | {run.get('rel_diff_vs_first', '—')} |"
                  for name, run in steps.items()] + [""]
    loops = {k: v for k, v in results.get("loop", {}).items() if "step_s" in v}
    if loops:
        lines += [f"| sampler loop, {LOOP_STEPS} steps | step_s | warm-up s | peak GiB | traced GPU idle ms (of wall) | kernels | latents difference |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {name} | {run['step_s']} | {run['warmup_s']} | {run['peak_gib']} | {run['traced_gpu_idle_ms']} "
                  f"(of {run['traced_gpu_wall_ms']}) | {run['kernels']} | {run.get('rel_diff_vs_compiled', '—')} |"
                  for name, run in loops.items()] + [""]
    held = {k: v for k, v in results.get("sustained", {}).items() if "sustained_tflops" in v}
    if held:
        lines += ["| held for 20 s | TFLOP/s in a burst | TFLOP/s, last 5 s | first second |", "| --- | --- | --- | --- |"]
        lines += [f"| {name} | {run['burst_tflops']} | {run['sustained_tflops']} | {run['tflops_by_second'][0]} |" for name, run in held.items()] + [""]
    convs = {k: v for k, v in results.get("conv", {}).items() if "ms" in v}
    if convs:
        lines += ["| VAE 96-channel convolution, 832x480, 4 frames | ms | convolution kernel | difference |", "| --- | --- | --- | --- |"]
        lines += [f"| {name} | {run['ms']} | {run['top_kernels_ms'][0][0][:60]} | {run.get('rel_diff_vs_conv3d', '—')} |" for name, run in convs.items()] + [""]
    crosses = {k: v for k, v in results.get("cross", {}).items() if "ms" in v}
    if crosses:
        lines += [f"| cross-attention, 32,760 tokens over {CROSS_REAL_TOKENS} text tokens | ms | attention kernel | difference |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {name} | {run['ms']} | {run['top_kernels_ms'][0][0][:60]} | {run.get('rel_diff_vs_fa3_512', '—')} |"
                  for name, run in crosses.items()] + [""]
    for name, run in results.get("vae_ops", {}).items():
        if "ops" in run:
            lines += [f"| VAE decode ({name}, {run['decode_s']} s): aten op | input shapes | GPU ms | calls |", "| --- | --- | --- | --- |"]
            lines += [f"| {op} | {shapes[:90]} | {ms} | {calls} |" for op, shapes, ms, calls in run["ops"]] + [""]
    shapes = results.get("kernels", {}).get("shapes", {})
    if shapes:
        lines += ["| single operation at the DiT's shapes | ms or relative difference |", "| --- | --- |"]
        lines += [f"| {key} | {value} |" for key, value in shapes.items() if key != "wall_s"] + [""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="*", default=["kernels", "dit", "vae"], help="kernels, dit, vae, or section:variant")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    parser.add_argument("--tag", default="", help="suffix for the result files")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    profiler = Profiler(out, args.tag)
    for target in args.targets:
        section, _, name = target.partition(":")
        names = [name] if name else list({"dit": DIT_VARIANTS, "vae": VAE_VARIANTS, "kernels": ["shapes"], "cfg": CFG_VARIANTS,
                                          "loop": LOOP_VARIANTS, "sustained": SUSTAINED, "conv": CONV_VARIANTS, "cross": CROSS_VARIANTS,
                                          "vae_ops": ["fast"]}[section])
        for variant in names:
            profiler.run(section, variant)
    print(markdown(profiler.results), flush=True)


if __name__ == "__main__":
    main()

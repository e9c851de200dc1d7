"""GPU benchmark: diffusers' WanPipeline against our pipeline, side by side, in one run.

Full-size Wan2.1 T2V-1.3B shapes with random weights (speed does not depend on weight values):
the 1.3B DiT (bf16), the Wan VAE and the umT5-XXL encoder, built from the configs bundled in
`pipeline/configs/`. Workload: 832x480, 81 frames, guidance on. Every path gets the same noise
seed and the same text embeddings, and every optimised path's final latents are compared with our
exact reference path's.

Sections (each recorded even if another fails):
  text      umT5-XXL encode of a 40-token prompt: GPU, CPU bf16/fp32 at several thread counts, cache hit
  diffusers WanPipeline, `--steps` steps + fp32 VAE decode
  resident  the reference: our path with diffusers' DiT arrangement (not pipeline/dit.py's), PyTorch
            SDPA, eager, fp32 VAE: text embeddings -> latents -> frames -> MP4 file
  compiled  our path with regional torch.compile of the DiT blocks (warm-up timed separately)
  flash3    our path with FlashAttention-3 instead of SDPA (eager)
  fast      FlashAttention-3 + compiled blocks + bf16 VAE: what a production config runs
  fast_unshared  the same with block 0's self-attention computed by both guidance passes
  fast_prompt_first  `fast` with the CPU prompt encode before the generation, not during it
  vae       bf16 (plain and as VideoModel runs it with compile on) against fp32 decode of the same
            latents: time, peak memory, pixel error
  policies  offload and stream memory policies, `--policy-steps` steps + decode, peak GPU memory
  cfg_parallel, step_cache  (need the resident section first; cfg_parallel needs two GPUs)

Our paths write the MP4 while the VAE decodes (pipeline.video.Mp4Writer), so their generate time
includes the file; diffusers' frames are written afterwards, as its pipeline returns them.
After the `text` section our paths also start the prompt's CPU encode with the generation and get
it as a pending call (as the service's generator does), so their generate time is prompt -> MP4;
diffusers' end-to-end time adds the CPU encode, as its pipeline encodes before it denoises.

Usage (on the GPU machine): python bench/gpu.py [--steps 50] [--policy-steps 10] [--out DIR] [section ...]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.diffusers_compat import replace_processor  # noqa: E402
from pipeline.dit import HalvesRopeProcessor  # noqa: E402
from pipeline.generator import VideoModel  # noqa: E402
from pipeline.memory import MemoryPolicy  # noqa: E402
from pipeline.params import GenerationParams  # noqa: E402
from pipeline.sampler import flow_sigmas  # noqa: E402
from pipeline.text import pad_context  # noqa: E402
from pipeline.vae import compile_norms, speed_up_decode  # noqa: E402
from pipeline.video import write_mp4  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "pipeline" / "configs"
DEVICE = torch.device("cuda")
PROMPT = "A red fox trots through fresh snow at dawn, cinematic, soft light, 4k"  # ~40 umT5 tokens
GIB = 2**30
# variant -> (attention kernel, compiled DiT blocks, VAE dtype). Every variant but `reference` runs the
# DiT as VideoModel does, with pipeline/dit.py's arrangement. A variant undoes one of its savings, to
# measure it in the same run: `fast_unshared` computes block 0's self-attention in both passes of a
# guidance step.
VARIANTS = {
    "reference": ("sdpa", False, torch.float32),  # diffusers' DiT arrangement: what every path is compared with
    "exact": ("sdpa", False, torch.float32),
    "compiled": ("sdpa", True, torch.float32),
    "flash3": ("flash3", False, torch.float32),
    "fast": ("flash3", True, torch.bfloat16),
    "fast_unshared": ("flash3", True, torch.bfloat16),
    # Step caches: diffusers' cache hooks keep Python state per block, which a fullgraph compile cannot trace.
    "fast_eager": ("flash3", False, torch.bfloat16),
}


def log(*parts) -> None:
    print(*parts, flush=True)


def load_config(name: str) -> dict:
    return {k: v for k, v in json.loads((CONFIGS / f"{name}.json").read_text()).items() if not k.startswith("_")}


def build_dit():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    with torch.device(DEVICE):
        return WanTransformer3DModel(**load_config("transformer")).to(torch.bfloat16).eval().requires_grad_(False)


def build_vae(dtype=torch.float32):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    with torch.device(DEVICE):
        return AutoencoderKLWan(**load_config("vae")).to(dtype).eval().requires_grad_(False)


def synced(fn):
    torch.cuda.synchronize()
    started = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - started


def peak_gib() -> float:
    return round(torch.cuda.max_memory_allocated() / GIB, 2)


def reset_memory() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


class Bench:
    def __init__(self, args):
        self.args = args
        self.results: dict = {
            "device": torch.cuda.get_device_name(0),
            "date": datetime.date.today().isoformat(),
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "workload": {"size": "832*480", "frame_num": 81, "steps": args.steps, "guide_scale": 6.0, "shift": 8.0, "seed": 42},
        }
        import diffusers

        self.results["diffusers_version"] = diffusers.__version__
        generator = torch.Generator().manual_seed(1)
        # Real-token embeddings as the text stage returns them: 40 + 120 tokens of 4096 dims, bf16.
        self.context = (torch.randn(40, 4096, generator=generator) * 0.1).to(torch.bfloat16)
        self.negative_context = (torch.randn(120, 4096, generator=generator) * 0.1).to(torch.bfloat16)
        self.params = GenerationParams(prompt=PROMPT, sample_steps=args.steps, seed=42)
        self.reference_latents: torch.Tensor | None = None
        self.reference_step_s: float | None = None
        self.prompt_encoder = None  # the umT5-XXL run_ours encodes with: the text section's is on the CPU in bf16
        self.encode_thread = ThreadPoolExecutor(max_workers=1)

    # -- helpers -------------------------------------------------------------------------------

    def save(self) -> None:
        slug = re.sub(r"[^a-z0-9]+", "-", self.results["device"].lower()).strip("-")
        path = Path(self.args.out) / f"{slug}-{self.results['date']}{self.args.tag and '-' + self.args.tag}.json"
        path.write_text(json.dumps(self.results, indent=1))

    def section(self, name: str, fn) -> None:
        log(f"== {name}")
        reset_memory()
        started = time.perf_counter()
        try:
            self.results[name] = fn()
        except Exception as error:  # noqa: BLE001 - record and go on with the other sections
            traceback.print_exc()
            self.results[name] = {"error": repr(error)[:500]}
        self.results[name]["section_wall_s"] = round(time.perf_counter() - started, 1)
        log(name, json.dumps(self.results[name]))
        self.save()
        reset_memory()

    def model(self, variant: str, two_gpus: bool = False, dit=None, vae=None, policy=MemoryPolicy.RESIDENT,
              adapters=None) -> VideoModel:
        """A VideoModel in one of the benchmarked variants (see VARIANTS), serving LoRA `adapters` if given."""
        import pipeline.generator as generator_module

        attention, compiled, vae_dtype = VARIANTS[variant]
        rearrange = generator_module.rearrange_blocks
        if variant == "reference":
            generator_module.rearrange_blocks = lambda transformer: None
        try:
            model = VideoModel(dit if dit is not None else build_dit(), vae if vae is not None else build_vae(vae_dtype), DEVICE,
                               policy, torch.device("cuda:1") if two_gpus else None, attention=attention, adapters=adapters)
        finally:
            generator_module.rearrange_blocks = rearrange
        if variant == "fast_unshared":
            replace_processor(model.models.transformer.blocks[0].attn1, HalvesRopeProcessor())
        if compiled:
            self.warmup_s = model.compile(self.params, cache_root=self.args.compile_cache)
        else:
            # A model's first generation pays one-off costs (cuBLAS/cuDNN set-up, kernel choice: about 2 s on
            # an H100 when it is the process's first); an untimed one-step run keeps them out of every timing.
            _, self.warmup_s = synced(lambda: model.generate(self.params.model_copy(update={"sample_steps": 1}),
                                                             self.context, self.negative_context))
        return model

    def run_ours(self, model: VideoModel, params: GenerationParams, prompt_first: bool = False) -> dict:
        """One generation through VideoModel into an MP4 file, with per-step timestamps and the final latents.

        `prompt_first`: the CPU prompt encode runs before the generation instead of during it.
        """
        import pipeline.generator as generator_module

        stamps: list[torch.cuda.Event] = []  # recorded on the GPU stream: a per-step sync would idle the GPU between steps
        captured = {}
        decode = generator_module.decode_latents

        def capture(vae, latents, on_frames=None):
            captured["latents"] = latents.detach().clone()
            return decode(vae, latents, on_frames)

        def on_progress(phase, step, total):
            if phase == "denoise":
                stamps.append(torch.cuda.Event(enable_timing=True))
                stamps[-1].record()

        generator_module.decode_latents = capture
        with tempfile.TemporaryDirectory() as folder:
            try:
                reset_memory()
                result, total_s = synced(lambda: model.generate(params, self.encoding_prompt(prompt_first), self.negative_context,
                                                                on_progress, video_path=Path(folder) / "video.mp4"))
            finally:
                generator_module.decode_latents = decode
        steps = len(stamps)
        per_step = stamps[0].elapsed_time(stamps[-1]) / 1000 / (steps - 1) if steps > 1 else result.timings["denoise"]
        return {
            "steps": steps,
            "per_step_s": round(per_step, 4),
            "denoise_s": round(result.timings["denoise"], 2),
            "decode_s": round(result.timings["decode"], 2),
            "mp4_write_after_decode_s": round(result.timings["mp4_write"], 2),
            "generate_s": round(total_s, 2),
            "prompt_encode": "none" if self.prompt_encoder is None else "before" if prompt_first else "during",
            "prompt_device": None if self.prompt_encoder is None else self.prompt_encoder.device.type,
            "prompt_wait_s": round(result.timings.get("prompt_wait", 0.0), 3),
            "peak_gib": round(result.peak_gpu_bytes / GIB, 2),
            "_latents": captured["latents"].to(DEVICE),
        }

    def encoding_prompt(self, first: bool):
        """Starts the 40-token prompt's encode by `prompt_encoder` (bf16, no cache: as a TextEncoder replica
        runs a new prompt) and returns the call that waits for it, or with `first` the embeddings once it
        is done; without an encoder, the embeddings at once.

        The benchmark's fixed embeddings stand in for the random umT5's output, so that every path's
        latents stay comparable: the encode runs for its time, on its device.
        """
        if self.prompt_encoder is None:
            return self.context
        encoded = self.encode_thread.submit(self.prompt_encoder._run_encoder, [PROMPT[:39]])

        def wait() -> torch.Tensor:
            encoded.result()
            return self.context

        return wait() if first else wait

    def end_to_end(self, run: dict) -> float:
        """Prompt -> MP4 file: generation (+ the CPU text encode, unless the generation ran it) (+ a separate MP4 write)."""
        text_s = self.results.get("text", {}).get("cpu_default_40_tokens_s", 0.0) if run.get("prompt_encode", "none") == "none" else 0.0
        return round(text_s + run["generate_s"] + run.get("mp4_write_s", 0.0), 2)

    def check_latents(self, run: dict) -> dict:
        latents = run.pop("_latents")
        if self.reference_latents is None:
            return {}
        return {"latents_rel_error_vs_reference": relative_error(latents, self.reference_latents)}

    # -- sections ------------------------------------------------------------------------------

    def text(self) -> dict:
        from transformers import UMT5Config, UMT5EncoderModel

        from pipeline.demo import build_tokenizer
        from pipeline.text import PromptEncoder

        config = UMT5Config(**load_config("text_encoder"))
        torch.manual_seed(0)
        with torch.device(DEVICE):
            model = UMT5EncoderModel(config).to(torch.bfloat16).eval().requires_grad_(False)
        tokenizer = build_tokenizer()  # byte-level stand-in; the encoder cost depends on the token count
        n_tokens = len(tokenizer(PROMPT[:39]).input_ids)
        out = {"tokens": n_tokens}
        encoder = PromptEncoder(tokenizer, model, DEVICE)
        encoder.encode([PROMPT[:39] + "!"])
        out["gpu_40_tokens_s"] = round(synced(lambda: encoder._run_encoder([PROMPT[:39]]))[1], 4)
        model = model.cpu()
        torch.cuda.empty_cache()
        for dtype in (torch.bfloat16, torch.float32):
            model = model.to(dtype)
            encoder = PromptEncoder(tokenizer, model, torch.device("cpu"))
            for threads in (4, 8, 16):
                torch.set_num_threads(threads)
                encoder._run_encoder([PROMPT[:20]])  # warm
                started = time.perf_counter()
                for _ in range(3):
                    encoder._run_encoder([PROMPT[:39]])
                out[f"cpu_{str(dtype)[6:]}_{threads}threads_s"] = round((time.perf_counter() - started) / 3, 3)
        torch.set_num_threads(os.cpu_count())
        self.prompt_encoder = PromptEncoder(tokenizer, model.to(torch.bfloat16), torch.device("cpu"))
        cpu_times = {k: v for k, v in out.items() if k.startswith("cpu_")}
        best = min(cpu_times, key=cpu_times.get)
        out["cpu_fastest"] = best
        out["cpu_default_40_tokens_s"] = out["cpu_bfloat16_16threads_s"]
        encoder.encode([PROMPT[:39]])
        started = time.perf_counter()
        encoder.encode([PROMPT[:39]])
        out["cache_hit_s"] = round(time.perf_counter() - started, 6)
        return out

    def diffusers(self) -> dict:
        from diffusers import UniPCMultistepScheduler, WanPipeline

        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=8.0)
        pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=build_dit(), vae=build_vae(), scheduler=scheduler)
        context = pad_context(self.context).unsqueeze(0).to(DEVICE)
        negative = pad_context(self.negative_context).unsqueeze(0).to(DEVICE)
        stamps, captured = [], {}

        def on_step(_pipe, i, t, kwargs):
            stamps.append(torch.cuda.Event(enable_timing=True))  # as in run_ours: no per-step sync
            stamps[-1].record()
            captured["latents"] = kwargs["latents"]
            return kwargs

        reset_memory()
        with torch.inference_mode():
            generator = torch.Generator(DEVICE).manual_seed(42)
            out, total_s = synced(lambda: pipe(
                prompt_embeds=context, negative_prompt_embeds=negative, height=480, width=832, num_frames=81,
                num_inference_steps=self.args.steps, guidance_scale=6.0, generator=generator, output_type="np",
                callback_on_step_end=on_step, callback_on_step_end_tensor_inputs=["latents"]))
        frames = (out.frames[0] * 255).round().astype("uint8")
        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            write_mp4(frames, Path(folder) / "video.mp4")
            mp4_s = time.perf_counter() - started
        first_to_last, first_step = stamps[0].elapsed_time(stamps[-1]) / 1000, stamps[0].elapsed_time(stamps[1]) / 1000
        run = {
            "per_step_s": round(first_to_last / (len(stamps) - 1), 4),
            "generate_s": round(total_s, 2),
            "decode_and_postprocess_s": round(total_s - first_to_last - first_step, 2),
            "mp4_write_s": round(mp4_s, 2),
            "peak_gib": peak_gib(),
        }
        run["end_to_end_s"] = self.end_to_end(run)
        self.diffusers_latents = captured["latents"].float()
        return run

    def resident(self) -> dict:
        model = self.model("reference")
        run = self.run_ours(model, self.params)
        self.reference_latents = run.pop("_latents")
        self.reference_step_s = run["per_step_s"]
        run["end_to_end_s"] = self.end_to_end(run)
        if getattr(self, "diffusers_latents", None) is not None:
            # Not zero by design: the official schedule starts at sigma 0.999, diffusers' default at 1.0.
            run["latents_rel_diff_vs_diffusers_default_schedule"] = relative_error(self.reference_latents, self.diffusers_latents)
        run["official_sigmas_first_last"] = [float(flow_sigmas(self.args.steps, 8.0)[0]), float(flow_sigmas(self.args.steps, 8.0)[-1])]
        del model
        return run

    def variant_run(self, variant: str, two_gpus: bool = False, step_cache: tuple[str, dict] | None = None,
                    prompt_first: bool = False) -> dict:
        """One 50-step generation in `variant`, its latents checked against the exact reference."""
        model = self.model(variant, two_gpus)
        if step_cache is not None:
            model.enable_step_cache(step_cache[0], **step_cache[1])
        run = self.run_ours(model, self.params, prompt_first)
        run.update(self.check_latents(run))
        run["end_to_end_s"] = self.end_to_end(run)
        run["variant"] = dict(zip(("attention", "compiled", "vae_dtype"), map(str, VARIANTS[variant])))
        run["compile_warmup_s" if VARIANTS[variant][1] else "warmup_s"] = round(self.warmup_s, 1)
        del model
        reset_memory()
        return run

    def compiled(self) -> dict:
        return self.variant_run("compiled")

    def flash3(self) -> dict:
        return self.variant_run("flash3")

    def fast(self) -> dict:
        return self.variant_run("fast")

    def fast_prompt_first(self) -> dict:
        return self.variant_run("fast", prompt_first=True)

    def fast_unshared(self) -> dict:
        return self.variant_run("fast_unshared")

    def vae(self) -> dict:
        if self.reference_latents is None:
            raise RuntimeError("needs the resident section first (its latents)")
        from pipeline.video import decode_latents

        out, frames = {}, {}
        variants = (("fp32", torch.float32, False, False), ("bf16", torch.bfloat16, False, False), ("bf16_fast", torch.bfloat16, False, True),
                    ("fp32_tiled", torch.float32, True, False), ("bf16_tiled", torch.bfloat16, True, False))
        for name, dtype, tiled, fast in variants:
            vae = build_vae(dtype)
            if tiled:
                vae.enable_tiling()
            if fast:  # what VideoModel runs on a GPU with compile on (pipeline/vae.py)
                speed_up_decode(vae, channels_last=True)
                compile_norms(vae)
            reset_memory()
            with torch.inference_mode():
                decode_latents(vae, self.reference_latents)  # warm
                reset_memory()
                frames[name], seconds = synced(lambda: decode_latents(vae, self.reference_latents))
            out[name] = {"decode_s": round(seconds, 2), "peak_gib": peak_gib()}
            del vae
            reset_memory()
        reference = torch.from_numpy(frames["fp32"]).float()
        for name in ("bf16", "bf16_fast", "fp32_tiled", "bf16_tiled"):
            diff = (torch.from_numpy(frames[name]).float() - reference).abs()
            mse = float((diff**2).mean())
            out[name]["mean_abs_pixel_error"] = round(float(diff.mean()), 3)
            out[name]["max_abs_pixel_error"] = int(diff.max())
            out[name]["psnr_db_vs_fp32"] = round(10 * torch.log10(torch.tensor(255.0**2 / max(mse, 1e-12))).item(), 2)
        return out

    def cfg_parallel(self) -> dict:
        """Two GPUs, one process: conditional branch on cuda:0, unconditional on cuda:1 (exact, then fast)."""
        if torch.cuda.device_count() < 2:
            raise RuntimeError("needs two GPUs")
        return {variant: self.variant_run(variant, two_gpus=True) for variant in self.args.cfg_variants.split(",")}

    def step_cache(self) -> dict:
        """Opt-in caching on one GPU (and with CFG-parallel where two GPUs exist), FA3 + bf16 VAE."""
        caches = {
            "first_block_0.05": ("first_block", {"threshold": 0.05}),
            "taylorseer_interval5": ("taylorseer", {"cache_interval": 5, "disable_cache_before_step": 3}),
        }
        out = {name: self.variant_run("fast_eager", step_cache=cache) for name, cache in caches.items()}
        if torch.cuda.device_count() >= 2:
            out["taylorseer_interval5_cfg_parallel"] = self.variant_run("fast_eager", two_gpus=True, step_cache=caches["taylorseer_interval5"])
        return out

    def policies(self) -> dict:
        params = self.params.model_copy(update={"sample_steps": self.args.policy_steps})
        out = {}
        variants = {
            "resident": (MemoryPolicy.RESIDENT, torch.float32),
            "offload": (MemoryPolicy.OFFLOAD, torch.float32),
            "stream": (MemoryPolicy.STREAM, torch.float32),
            "stream_bf16_vae": (MemoryPolicy.STREAM, torch.bfloat16),
        }
        variants = {name: variants[name] for name in self.args.policies.split(",")}
        for name, (policy, vae_dtype) in variants.items():
            dit = build_dit().cpu()
            vae = build_vae(vae_dtype)
            reset_memory()
            model = self.model("exact", dit=dit, vae=vae, policy=policy)
            run = self.run_ours(model, params)
            run.pop("_latents")
            out[name] = run
            del model, dit, vae
            reset_memory()
        for name in list(variants)[1:]:
            out[name]["slowdown_vs_resident"] = round(out[name]["generate_s"] / out["resident"]["generate_s"] - 1, 4)
        return out


def table(header: list[str], rows: list[list]) -> list[str]:
    """A Markdown table and the blank line after it."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows] + [""]


def markdown(results: dict) -> str:
    def get(section, key, default="—"):
        value = results.get(section, {}).get(key, default)
        return value

    lines = [
        f"# GPU benchmark — {results['device']}, {results['date']}",
        "",
        f"torch {results['torch']}, diffusers {results['diffusers_version']}; 832x480, 81 frames, "
        f"{results['workload']['steps']} steps, guidance 6.0, random weights of the real shapes.",
        "",
        "End to end: ours start the CPU prompt encode with the generation (the sampler waits for it after step 1's "
        "unconditional pass: `prompt wait`); diffusers' adds the CPU encode time of the `text` section.",
        "",
        "| path | s/step | generate s | prompt wait s | end to end s (prompt → MP4) | peak GiB | latents vs reference |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| diffusers WanPipeline | {get('diffusers', 'per_step_s')} | {get('diffusers', 'generate_s')} | — | {get('diffusers', 'end_to_end_s')} | {get('diffusers', 'peak_gib')} | (default schedule: {get('resident', 'latents_rel_diff_vs_diffusers_default_schedule')}) |",
        f"| ours, resident (exact reference) | {get('resident', 'per_step_s')} | {get('resident', 'generate_s')} | {get('resident', 'prompt_wait_s')} | {get('resident', 'end_to_end_s')} | {get('resident', 'peak_gib')} | 0 |",
    ]
    for section, name in (("compiled", "compiled blocks"), ("flash3", "FlashAttention-3"), ("fast", "FA3 + compiled + bf16 VAE"),
                          ("fast_unshared", "the same, block-0 self-attention not shared"),
                          ("fast_prompt_first", "the same, prompt encoded before the generation")):
        lines.append(f"| ours, {name} | {get(section, 'per_step_s')} | {get(section, 'generate_s')} | {get(section, 'prompt_wait_s')} | {get(section, 'end_to_end_s')} | "
                     f"{get(section, 'peak_gib')} | {get(section, 'latents_rel_error_vs_reference')} |")
    lines.append("")
    for section in ("cfg_parallel", "step_cache"):
        runs = {k: v for k, v in results.get(section, {}).items() if isinstance(v, dict)}
        if runs:
            lines += table([section, "s/step", "end to end s", "peak GiB", "latents vs reference"],
                           [[k, v.get("per_step_s"), v.get("end_to_end_s"), v.get("peak_gib"), v.get("latents_rel_error_vs_reference")] for k, v in runs.items()])
    policies = results.get("policies", {})
    if "resident" in policies:
        lines += table(["memory policy", "s/step", "generate s", "peak GiB", "slowdown vs resident"],
                       [[name, run["per_step_s"], run["generate_s"], run["peak_gib"], run.get("slowdown_vs_resident", 0)]
                        for name, run in policies.items() if isinstance(run, dict)])
    vae = results.get("vae", {})
    if "fp32" in vae:
        lines += table(["VAE decode", "s", "peak GiB", "PSNR vs fp32 dB", "mean abs px error"],
                       [[name, run["decode_s"], run["peak_gib"], run.get("psnr_db_vs_fp32", "∞"), run.get("mean_abs_pixel_error", 0)]
                        for name, run in ((name, vae[name]) for name in ("fp32", "bf16", "bf16_fast", "fp32_tiled", "bf16_tiled") if name in vae)])
    text = results.get("text", {})
    if "gpu_40_tokens_s" in text:
        lines += table(["umT5-XXL, 40 tokens", "s"], [[key, value] for key, value in text.items() if key.endswith("_s")])
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sections", nargs="*", default=["text", "diffusers", "resident", "compiled", "flash3", "fast", "vae", "policies"],
                        help="also: cfg_parallel, step_cache (after resident, whose latents are the reference)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--policy-steps", type=int, default=10)
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    parser.add_argument("--policies", default="resident,offload,stream,stream_bf16_vae", help="the memory policies `policies` runs (resident first)")
    parser.add_argument("--cfg-variants", default="exact,fast", help="the VARIANTS cfg_parallel runs")
    parser.add_argument("--compile-cache", default=None, help="keep compiled code in this folder between runs, as the service's generator.compile_cache_dir does")
    parser.add_argument("--tag", default="", help="suffix for the result files, e.g. 'policies50'")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    bench = Bench(args)
    for name in args.sections:
        bench.section(name, getattr(bench, name))
    table = markdown(bench.results)
    slug = re.sub(r"[^a-z0-9]+", "-", bench.results["device"].lower()).strip("-")
    (Path(args.out) / f"{slug}-{bench.results['date']}{args.tag and '-' + args.tag}.md").write_text(table)
    log(table)


if __name__ == "__main__":
    main()

"""GPU benchmark for few-step sampling and LoRA adapters (issue #20), side by side in one run.

Full-size Wan2.1 T2V-1.3B shapes with random weights, 832x480, 81 frames, on bench/gpu.py's `fast`
path (FlashAttention-3, compiled blocks warmed at start, bf16 VAE), with the prompt encoded by the
release folder's umT5-XXL while the generation starts (as the service does), so each generate time
is prompt -> MP4 file. The encoder runs on the CPU (12 threads, configs/single_gpu.yaml's) and, for
the few-step runs, also on the GPU beside the DiT (configs/fast_distilled.yaml's placement). Sections:

  few_step  one model, serving two random rank-`--rank` adapters on every Linear of every block as a
            replica serves them (pipeline.lora.ServedAdapters), none selected: 50 unipc steps with
            guidance 6 (the no-LoRA baseline), then 4 euler steps and the 3-step DMD schedule with
            guidance off (one DiT pass a step), with the prompt encoded on the CPU, then on the GPU
  lora      the same model with an adapter merged: 50 steps against the baseline, the time of each
            switch between adapters, and the graphs compiled after the warm-up (must be 0)

Usage (on the GPU machine, with a release folder for the text encoder):
    WAN_CKPT_DIR=/tmp/wan13b python bench/few_step_lora.py [--rank 64] [--out DIR] [--compile-cache DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu import Bench, build_dit, log, synced, table  # noqa: E402

from pipeline.generator import VideoModel  # noqa: E402
from pipeline.loading import load_text_encoder, local_source  # noqa: E402
from pipeline.text import PromptEncoder  # noqa: E402

# Every Linear of a Wan block, as adapters (CausVid, lightx2v, style LoRAs) commonly target them.
TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
           "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")
FEW_STEP = {
    "euler_4_steps": {"sample_solver": "euler", "sample_steps": 4, "sample_guide_scale": 1.0},
    "dmd_3_steps": {"sample_solver": "dmd", "sample_steps": 3, "sample_guide_scale": 1.0},
}
ADAPTERS = ("first", "second")


def graphs_compiled() -> int:
    return counters["stats"]["unique_graphs"]


def random_adapter(dit, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """lora_A/lora_B on every TARGETS Linear of every block, in bf16 on the CPU (speed does not depend on values)."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for index, block in enumerate(dit.blocks):
        for name in TARGETS:
            linear = block.get_submodule(name)
            state_dict[f"blocks.{index}.{name}.lora_A.weight"] = (torch.randn(rank, linear.in_features, generator=generator) * 0.01).bfloat16()
            state_dict[f"blocks.{index}.{name}.lora_B.weight"] = (torch.randn(linear.out_features, rank, generator=generator) * 0.01).bfloat16()
    return state_dict


class FewStepLora:
    def __init__(self, args):
        self.bench = Bench(args)
        self.bench.results["rank"] = args.rank
        self.args = args
        self.baseline: dict | None = None
        self.model: VideoModel | None = None  # the fast model serving the adapters, from few_step to lora

    def text_encoder(self, device: torch.device) -> PromptEncoder | None:
        """The release folder's umT5-XXL in bf16 on `device` (on the CPU at the service's 12 threads), its
        40-token encode time recorded; None without a folder."""
        folder = os.environ.get("WAN_CKPT_DIR")
        if not folder:
            log("no WAN_CKPT_DIR: generate times exclude the prompt encode")
            return None
        torch.set_num_threads(12)
        tokenizer, encoder = load_text_encoder(local_source(Path(folder), "WAN_CKPT_DIR"), device, torch.bfloat16)
        encoder = PromptEncoder(tokenizer, encoder, device)
        self.bench.results.setdefault("text_encoder", {"threads": torch.get_num_threads()})[f"{device.type}_probe_40_tokens_s"] = round(encoder.probe_seconds(40), 3)
        return encoder

    def few_step(self) -> dict:
        bench, dit = self.bench, build_dit()
        adapters = {name: (random_adapter(dit, self.args.rank, seed), 1.0) for seed, name in enumerate(ADAPTERS)}
        self.model = bench.model("fast", dit=dit, adapters=adapters)
        out = {"compile_warmup_s": round(bench.warmup_s, 1)}
        self.baseline = bench.run_ours(self.model, bench.params)
        self.baseline.pop("_latents")
        out["unipc_50_steps_guidance_6"] = self.baseline
        out.update(self.few_step_runs(""))
        cpu_encoder = bench.prompt_encoder
        # The GPU encoder is loaded only now, so that the other runs' peaks are the generation's own.
        bench.prompt_encoder = self.text_encoder(torch.device("cuda"))
        if bench.prompt_encoder is not None:
            out.update(self.few_step_runs("_gpu_prompt"))
        bench.prompt_encoder = cpu_encoder
        torch.cuda.empty_cache()
        return out

    def few_step_runs(self, suffix: str) -> dict:
        """Each FEW_STEP run with the bench's current prompt encoder, named with `suffix`."""
        out = {}
        for name, update in FEW_STEP.items():
            before = graphs_compiled()
            run = self.bench.run_ours(self.model, self.bench.params.model_copy(update=update))
            run.pop("_latents")
            run["graphs_compiled"] = graphs_compiled() - before
            out[name + suffix] = run
        return out

    def lora(self) -> dict:
        bench, model = self.bench, self.model
        served = model.adapters
        before = graphs_compiled()
        run = bench.run_ours(model, bench.params.model_copy(update={"lora": ADAPTERS[0]}))
        run.pop("_latents")
        out = {"rank": self.args.rank, "modules": len(served.base_weights), "merged_50_steps": run,
               "host_gib_for_base_weights": round(sum(w.numel() * w.element_size() for w in served.base_weights.values()) / 2**30, 2)}
        switches = {}
        for name in (ADAPTERS[1], None, ADAPTERS[0], ADAPTERS[1]):
            _, seconds = synced(lambda: served.use(name, 0.8))
            switches[str(name)] = round(seconds, 4)
        out["switch_s"] = switches
        model.generate(bench.params.model_copy(update={"lora": ADAPTERS[0], "sample_steps": 2}), bench.context, bench.negative_context)
        out["graphs_compiled_after_warm_up"] = graphs_compiled() - before
        out["lora_vs_no_lora_per_step"] = round(run["per_step_s"] / self.baseline["per_step_s"], 4)
        out["lora_vs_no_lora_generate"] = round(run["generate_s"] / self.baseline["generate_s"], 4)
        return out


def markdown(results: dict) -> str:
    few, lora = results.get("few_step", {}), results.get("lora", {})
    names = ["unipc_50_steps_guidance_6", *FEW_STEP, *(f"{name}_gpu_prompt" for name in FEW_STEP)]
    rows = [[name, few.get(name, {}).get("generate_s"), few.get(name, {}).get("prompt_wait_s"), few.get(name, {}).get("per_step_s"),
             few.get(name, {}).get("peak_gib")] for name in names if name in few]
    merged = lora.get("merged_50_steps", {})
    rows.append(["unipc_50_steps_guidance_6 + LoRA", merged.get("generate_s"), merged.get("prompt_wait_s"), merged.get("per_step_s"), merged.get("peak_gib")])
    lines = [f"# Few-step and LoRA — {results['device']}, {results['date']}", "",
             f"torch {results['torch']}, diffusers {results['diffusers_version']}; 832*480, 81 frames; fast path (FA3, compiled, bf16 VAE); "
             f"generate = prompt -> MP4 file, the prompt encoded by umT5-XXL on the CPU ({results.get('text_encoder', {}).get('threads', '—')} threads) "
             "or, in the `_gpu_prompt` runs, on the GPU beside the DiT (whose peak GiB then include umT5's 10.6 GiB of weights).", ""]
    lines += table(["run", "generate s (prompt -> MP4)", "prompt wait s", "s/step", "peak GiB"], rows)
    lines += table(["LoRA (rank %s, %s Linears, merged)" % (lora.get("rank"), lora.get("modules")), "value"], [
        ["LoRA / no LoRA, per step", lora.get("lora_vs_no_lora_per_step")],
        ["LoRA / no LoRA, 50-step video", lora.get("lora_vs_no_lora_generate")],
        ["switch between adapters (s)", lora.get("switch_s")],
        ["graphs compiled after the warm-up", lora.get("graphs_compiled_after_warm_up")],
        ["host memory for the kept base weights (GiB)", lora.get("host_gib_for_base_weights")],
    ])
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    parser.add_argument("--compile-cache", default=None)
    parser.add_argument("--tag", default="few-step-lora")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    run = FewStepLora(args)
    started = time.perf_counter()
    run.bench.prompt_encoder = run.text_encoder(torch.device("cpu"))
    for name in ("few_step", "lora"):
        run.bench.section(name, getattr(run, name))
    run.bench.results["wall_s"] = round(time.perf_counter() - started, 1)
    run.bench.save()
    text = markdown(run.bench.results)
    slug = re.sub(r"[^a-z0-9]+", "-", run.bench.results["device"].lower()).strip("-")
    (Path(args.out) / f"{slug}-{run.bench.results['date']}-{args.tag}.md").write_text(text)
    log(text)


if __name__ == "__main__":
    main()

"""GPU benchmark for few-step sampling and LoRA adapters (issue #20), side by side in one run.

Full-size Wan2.1 T2V-1.3B shapes with random weights, 832x480, 81 frames, on bench/gpu.py's `fast`
path (FlashAttention-3, compiled blocks warmed at start, bf16 VAE), with the prompt encoded on the
CPU by the release folder's umT5-XXL while the generation starts (as the service does), so each
generate time is prompt -> MP4 file. Sections:

  few_step  the same model: 50 unipc steps with guidance 6 (the no-LoRA baseline), then 4 euler
            steps and the 3-step DMD schedule with guidance off (one DiT pass a step)
  lora      two random rank-`--rank` adapters on every Linear of every block, served as the service
            serves them (pipeline.lora.ServedAdapters, unfused, hot-swapped into one slot): 50 steps
            with an adapter against the baseline, the time of each switch and the graphs compiled
            after the warm-up (must be 0); then the alternative, fusing: the adapter merged into the
            baseline model's weights (its step time) and the cost of a fused switch (restore + merge)

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
from gpu import DEVICE, Bench, build_dit, build_vae, log, reset_memory, synced, table  # noqa: E402

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
FUSED_STEPS = 10  # the fused model's step time: as many steps as a per-step figure needs


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
        self.model: VideoModel | None = None  # the no-LoRA fast model, from few_step to the fused part of lora

    def text_encoder(self) -> None:
        """The release folder's umT5-XXL on the CPU in bf16 at the service's 12 threads: bench.run_ours encodes with it."""
        folder = os.environ.get("WAN_CKPT_DIR")
        if not folder:
            log("no WAN_CKPT_DIR: generate times exclude the prompt encode")
            return
        torch.set_num_threads(12)
        tokenizer, encoder = load_text_encoder(local_source(Path(folder), "WAN_CKPT_DIR"), torch.device("cpu"), torch.bfloat16)
        self.bench.cpu_prompts = PromptEncoder(tokenizer, encoder, torch.device("cpu"))
        self.bench.results["text_encoder"] = {"threads": torch.get_num_threads(), "probe_40_tokens_s": round(self.bench.cpu_prompts.probe_seconds(40), 3)}

    def few_step(self) -> dict:
        bench = self.bench
        self.model = bench.model("fast")
        out = {"compile_warmup_s": round(bench.warmup_s, 1)}
        self.baseline = bench.run_ours(self.model, bench.params)
        self.baseline.pop("_latents")
        out["unipc_50_steps_guidance_6"] = self.baseline
        for name, update in FEW_STEP.items():
            before = graphs_compiled()
            run = bench.run_ours(self.model, bench.params.model_copy(update=update))
            run.pop("_latents")
            run["graphs_compiled"] = graphs_compiled() - before
            out[name] = run
        return out

    def lora(self) -> dict:
        bench, rank = self.bench, self.args.rank
        dit = build_dit()
        adapters = {name: (random_adapter(dit, rank, seed), 1.0) for seed, name in enumerate(("first", "second"))}
        model = VideoModel(dit, build_vae(torch.bfloat16), DEVICE, attention="flash3", adapters=adapters)
        out = {"rank": rank, "modules": len(model.adapters.slots),
               "compile_warmup_s": round(model.compile(bench.params, cache_root=self.args.compile_cache), 1)}
        after_warm_up = graphs_compiled()
        run = bench.run_ours(model, bench.params.model_copy(update={"lora": "first"}))
        run.pop("_latents")
        out["unfused_50_steps"] = run
        switches = {}
        for name in ("second", None, "first", "second"):
            _, seconds = synced(lambda: model.adapters.use(name, 0.8))
            switches[str(name)] = round(seconds, 4)
        one_step = bench.params.model_copy(update={"lora": "second", "lora_scale": 0.8, "sample_steps": 2})
        model.generate(one_step, bench.context, bench.negative_context)
        out["switch_s"] = switches
        out["graphs_compiled_after_warm_up"] = graphs_compiled() - after_warm_up
        if self.baseline:
            out["unfused_vs_no_lora_per_step"] = round(run["per_step_s"] / self.baseline["per_step_s"], 4)
            out["unfused_vs_no_lora_generate"] = round(run["generate_s"] / self.baseline["generate_s"], 4)
        del model, dit
        reset_memory()
        if self.model is not None:
            out["fused"] = self.fused(adapters["first"][0])
        return out

    def fused(self, adapter: dict[str, torch.Tensor]) -> dict:
        """Fusing instead: the adapter merged into the no-LoRA model's weights (W + B @ A); a switch
        restores each weight from a kept copy and merges the next adapter."""
        transformer = self.model.models.transformer
        weights = {name.removesuffix(".lora_A.weight"): None for name in adapter if name.endswith("lora_A.weight")}
        for name in weights:
            weights[name] = transformer.get_submodule(name).weight
        kept = {name: weight.detach().clone() for name, weight in weights.items()}
        pairs = {name: (adapter[f"{name}.lora_A.weight"].to(DEVICE), adapter[f"{name}.lora_B.weight"].to(DEVICE)) for name in weights}

        @torch.no_grad()
        def switch(scale: float) -> None:
            for name, weight in weights.items():
                down, up = pairs[name]
                weight.copy_(kept[name]).addmm_(up, down, alpha=scale)

        before = graphs_compiled()
        _, switch_s = synced(lambda: switch(1.0))
        params = self.bench.params.model_copy(update={"sample_steps": FUSED_STEPS})
        run = self.bench.run_ours(self.model, params)
        run.pop("_latents")
        out = {"switch_s": round(switch_s, 4), "per_step_s": run["per_step_s"], "graphs_compiled": graphs_compiled() - before,
               "extra_gpu_gib_for_kept_weights": round(sum(w.numel() * w.element_size() for w in kept.values()) / 2**30, 2)}
        if self.baseline:
            out["fused_vs_no_lora_per_step"] = round(run["per_step_s"] / self.baseline["per_step_s"], 4)
        return out


def markdown(results: dict) -> str:
    few, lora = results.get("few_step", {}), results.get("lora", {})
    rows = [[name, few.get(name, {}).get("generate_s"), few.get(name, {}).get("per_step_s"), few.get(name, {}).get("peak_gib")]
            for name in ("unipc_50_steps_guidance_6", *FEW_STEP)]
    lines = [f"# Few-step and LoRA — {results['device']}, {results['date']}", "",
             f"torch {results['torch']}, diffusers {results['diffusers_version']}; 832*480, 81 frames; fast path (FA3, compiled, bf16 VAE); "
             f"generate = prompt (CPU umT5, {results.get('text_encoder', {}).get('threads', '—')} threads) -> MP4 file.", ""]
    lines += table(["run", "generate s (prompt -> MP4)", "s/step", "peak GiB"], rows)
    fused = lora.get("fused", {})
    lines += table(["LoRA (rank %s, %s Linears)" % (lora.get("rank"), lora.get("modules")), "value"], [
        ["unfused (served) / no LoRA, per step", lora.get("unfused_vs_no_lora_per_step")],
        ["unfused / no LoRA, 50-step video", lora.get("unfused_vs_no_lora_generate")],
        ["switch between adapters (s)", lora.get("switch_s")],
        ["graphs compiled after the warm-up", lora.get("graphs_compiled_after_warm_up")],
        ["fused / no LoRA, per step", fused.get("fused_vs_no_lora_per_step")],
        ["fused switch: restore + merge (s)", fused.get("switch_s")],
        ["fused: GPU memory for the kept base weights (GiB)", fused.get("extra_gpu_gib_for_kept_weights")],
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
    run.text_encoder()
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

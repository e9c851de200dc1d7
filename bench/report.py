"""Print the README's performance table from the committed result files in bench/results/.

Usage: python bench/report.py [RESULTS_DIR]   (paste the output between the README's markers)
Each row names the result file it comes from; every comparison is from one run on one machine.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results")
BASE = "nvidia-h100-80gb-hbm3-2026-11-26"
MAIN = "nvidia-h100-80gb-hbm3-2026-11-27-fast-v6-overlap-reversed"  # current code: prompt encoded during step 1, and before
OVERLAP_OTHER_ORDER = "nvidia-h100-80gb-hbm3-2026-11-27-fast-v6-overlap"  # the same machine minutes earlier, other order
FIFTH_HOST = "nvidia-h100-80gb-hbm3-2026-11-27-fast-v6"  # current code with the reference, on the day's slowest card
SAVINGS = "nvidia-h100-80gb-hbm3-2026-11-27-fast-v5-reversed"  # the DiT savings, each undone in one run; fast measured last
SAME_MACHINE = "nvidia-h100-80gb-hbm3-2026-11-27-fast-v5"  # minutes earlier, fast measured first
OTHER_HOST = "nvidia-h100-80gb-hbm3-2026-11-27-fast-v4"  # another H100, block-0 sharing only
TWO_GPUS = "nvidia-h100-80gb-hbm3-2026-11-27-fast-v5-cfg"  # a third host: one GPU and CFG-parallel, current DiT
FOURTH_HOST = "nvidia-h100-80gb-hbm3-2026-11-27-fast-v5-host-d"  # a fourth host, current DiT
CACHES = "nvidia-h100-80gb-hbm3-2026-11-27-cache-v4"  # step caches, measured again after the fused elementwise DiT


def load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def end_to_end(run: dict) -> float:
    """Prompt -> MP4 file where the run recorded it, else generation + MP4 write (no text encode)."""
    return run.get("end_to_end_s") or run["generate_s"] + run.get("mp4_write_s", 0)


def main() -> None:
    main_run, other_order, fifth_host = load(MAIN), load(OVERLAP_OTHER_ORDER), load(FIFTH_HOST)
    savings, same_machine, other_host, fourth_host = load(SAVINGS), load(SAME_MACHINE), load(OTHER_HOST), load(FOURTH_HOST)
    before_run, first_run = load(f"{BASE}-fast-v3"), load(f"{BASE}-fast")
    two_gpus, two_gpus_before, caches = load(TWO_GPUS), load(f"{BASE}-fast-v3-cfg"), load(CACHES)
    policies = load(f"{BASE}-policies50-v3-warm")["policies"]
    offload = load(f"{BASE}-policies50-v3")["policies"]["offload"]  # that run's resident was timed cold: no ratio
    cfg, cfg_before, cache = two_gpus["cfg_parallel"], two_gpus_before["cfg_parallel"], caches["step_cache"]
    rows = [
        ("diffusers WanPipeline (baseline)", main_run["diffusers"], None, MAIN),
        ("ours, fast: FA3 + compiled + rearranged DiT + bf16 VAE, prompt encoded during step 1", main_run["fast"], main_run["diffusers"], MAIN),
        ("ours, fast, prompt encoded before the generation", main_run["fast_prompt_first"], main_run["diffusers"], MAIN),
        ("ours, fast, prompt encoded before (baseline of its run: same machine, other order)", other_order["fast_prompt_first"], None, OVERLAP_OTHER_ORDER),
        ("ours, fast, prompt encoded during step 1 (same machine, other order)", other_order["fast"], other_order["fast_prompt_first"], OVERLAP_OTHER_ORDER),
        ("diffusers WanPipeline (baseline, another H100)", fifth_host["diffusers"], None, FIFTH_HOST),
        ("ours, reference (SDPA, eager, fp32 VAE; another H100)", fifth_host["resident"], fifth_host["diffusers"], FIFTH_HOST),
        ("ours, fast, prompt encoded during step 1 (another H100)", fifth_host["fast"], fifth_host["diffusers"], FIFTH_HOST),
        ("diffusers WanPipeline (baseline, before the prompt overlap)", savings["diffusers"], None, SAVINGS),
        ("ours, reference (before the prompt overlap)", savings["resident"], savings["diffusers"], SAVINGS),
        ("ours, fast (before the prompt overlap)", savings["fast"], savings["diffusers"], SAVINGS),
        ("ours, fast, block 0's self-attention in both guidance passes", savings["fast_unshared"], savings["diffusers"], SAVINGS),
        ("ours, fast, cross-attention over 512 padded text rows", savings["fast_padded"], savings["diffusers"], SAVINGS),
        ("diffusers WanPipeline (baseline, same machine, other order)", same_machine["diffusers"], None, SAME_MACHINE),
        ("ours, fast (measured first)", same_machine["fast"], same_machine["diffusers"], SAME_MACHINE),
        ("diffusers WanPipeline (baseline, a fourth H100)", fourth_host["diffusers"], None, FOURTH_HOST),
        ("ours, reference (a fourth H100)", fourth_host["resident"], fourth_host["diffusers"], FOURTH_HOST),
        ("ours, fast (a fourth H100)", fourth_host["fast"], fourth_host["diffusers"], FOURTH_HOST),
        ("diffusers WanPipeline (baseline, another H100)", other_host["diffusers"], None, OTHER_HOST),
        ("ours, fast, block 0 shared, cross-attention over 512 rows (another H100)", other_host["fast"], other_host["diffusers"], OTHER_HOST),
        ("ours, fast, block 0 not shared, 512 rows (another H100)", other_host["fast_unshared"], other_host["diffusers"], OTHER_HOST),
        ("diffusers WanPipeline (baseline, earlier run)", before_run["diffusers"], None, f"{BASE}-fast-v3"),
        ("ours, fast before sharing block 0 and compact cross-attention", before_run["fast"], before_run["diffusers"], f"{BASE}-fast-v3"),
        ("diffusers WanPipeline (baseline, first run)", first_run["diffusers"], None, f"{BASE}-fast"),
        ("ours, compiled DiT blocks (SDPA, fp32 VAE)", first_run["compiled"], first_run["diffusers"], f"{BASE}-fast"),
        ("ours, FlashAttention-3 (eager, fp32 VAE)", first_run["flash3"], first_run["diffusers"], f"{BASE}-fast"),
        ("ours, resident (policy run, no text encode)", policies["resident"], None, f"{BASE}-policies50-v3-warm"),
        ("ours, stream policy (fp32 VAE, tiled)", policies["stream"], policies["resident"], f"{BASE}-policies50-v3-warm"),
        ("ours, reference, one GPU (2-GPU host)", two_gpus["resident"], None, TWO_GPUS),
        ("ours, fast, one GPU (2-GPU host)", two_gpus["fast"], two_gpus["resident"], TWO_GPUS),
        ("ours, CFG-parallel, 2 GPUs, fast", cfg["fast"], two_gpus["resident"], TWO_GPUS),
        ("ours, reference, one GPU (2-GPU host, earlier run)", two_gpus_before["resident"], None, f"{BASE}-fast-v3-cfg"),
        ("ours, CFG-parallel, 2 GPUs, SDPA + fp32 VAE", cfg_before["exact"], two_gpus_before["resident"], f"{BASE}-fast-v3-cfg"),
        ("ours, CFG-parallel, 2 GPUs, fast (before the two savings)", cfg_before["fast"], two_gpus_before["resident"], f"{BASE}-fast-v3-cfg"),
        ("ours, reference, one GPU (2-GPU host, step-cache run)", caches["resident"], None, CACHES),
        ("ours, first-block cache 0.05 (opt-in), FA3 + bf16 VAE", cache["first_block_0.05"], caches["resident"], CACHES),
        ("ours, TaylorSeer step cache (opt-in), FA3 + bf16 VAE", cache["taylorseer_interval5"], caches["resident"], CACHES),
        ("ours, TaylorSeer + CFG-parallel, 2 GPUs", cache["taylorseer_interval5_cfg_parallel"], caches["resident"], CACHES),
    ]
    print(f"{main_run['device']}, {main_run['date']}; 832x480, 81 frames, 50 steps, guidance 6; random weights of the real shapes.\n")
    print("| path | s/step | prompt → MP4 file, s | vs baseline of its run | peak GPU GiB | latents vs reference | result file |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, run, baseline, source in rows:
        e2e = end_to_end(run)
        ratio = f"{e2e / end_to_end(baseline):.2f}×" if baseline else "1.00×"
        error = run.get("latents_rel_error_vs_reference")
        is_reference = "official_sigmas_first_last" in run  # a `resident` section: the run's reference path
        error = "0 (reference)" if is_reference else ("—" if error is None else f"{error:.3g}")
        print(f"| {name} | {run['per_step_s']:.3f} | {e2e:.2f} | {ratio} | {run['peak_gib']} | {error} | `{source}.json` |")
    text = main_run["text"]
    vae = before_run["vae"]  # the VAE decode has not changed since
    print(
        f"\numT5-XXL, 40-token prompt: {text['cpu_bfloat16_16threads_s']} s on 16 CPU cores in bf16 "
        f"(fp32 {text['cpu_float32_16threads_s']} s), {text['gpu_40_tokens_s']} s on the GPU, {text['cache_hit_s'] * 1000:.2f} ms "
        f"when cached. VAE decode: fp32 {vae['fp32']['decode_s']} s / {vae['fp32']['peak_gib']} GiB, bf16 "
        f"{vae['bf16']['decode_s']} s / {vae['bf16']['peak_gib']} GiB at {vae['bf16']['psnr_db_vs_fp32']} dB PSNR against fp32, "
        f"bf16 as the fast path decodes (pipeline/vae.py) {vae['bf16_fast']['decode_s']} s / {vae['bf16_fast']['peak_gib']} GiB "
        f"at {vae['bf16_fast']['psnr_db_vs_fp32']} dB. "
        f"Stream policy: peak {policies['stream']['peak_gib']} GiB, {policies['stream']['slowdown_vs_resident'] * 100:.1f} % "
        f"slower than resident over 50 steps. Offload (`{BASE}-policies50-v3`): peak {offload['peak_gib']} GiB, "
        f"{offload['per_step_s']} s per step, plus {offload['denoise_s'] - 50 * offload['per_step_s']:.1f} s per video "
        f"moving the DiT to the GPU and back."
    )


if __name__ == "__main__":
    main()

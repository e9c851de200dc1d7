"""`python -m pipeline`: one video from the command line, with the official Wan2.1 `generate.py` flags.

    python -m pipeline --model demo --prompt "a red fox in snow" --size 832*480 --frame_num 17 \
        --sample_steps 4 --base_seed 7 --save_file fox.mp4

Flags are checked by `GenerationParams` before torch and diffusers are imported, so a bad value
fails in a fraction of a second with the same message the HTTP API gives.
"""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime
from pathlib import Path

from pydantic import ValidationError
from tqdm import tqdm

from pipeline.attention import ATTENTION_KERNELS
from pipeline.flags import add_bool_flag
from pipeline.params import GenerationParams, describe_errors, flag_help

# Where the official generate.py spells a parameter differently.
OFFICIAL_FLAG_NAMES = {"seed": "base_seed"}
# GenerationParams leaves these to "the serving side"; here that is this process, with generate.py's defaults.
PLACEMENT_DEFAULTS = {"offload_model": True, "t5_cpu": False}
# The service takes a served adapter's name; this process has no registry, so --lora is a path, loaded
# under one fixed name that the generation then selects.
LORA_PATH_HELP = ("a LoRA adapter file or folder to apply (diffusers/PEFT, original Wan or ComfyUI format; "
                  "a folder holds one .safetensors); default: none")
CLI_ADAPTER = "cli"
DEMO_BANNER = "DEMO MODEL: random weights, not Wan2.1. The video will be noise; use --ckpt_dir for real output."


def build_parser() -> argparse.ArgumentParser:
    """The official flags; generation values stay strings here so `GenerationParams` converts and checks them."""
    parser = argparse.ArgumentParser(prog="python -m pipeline", description="Wan2.1 T2V-1.3B: text to an MP4.")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--ckpt_dir", help="a Wan2.1-T2V-1.3B folder (original or diffusers layout)")
    model.add_argument(
        "--model",
        default="auto",
        help="auto (./Wan2.1-T2V-1.3B*, $WAN_CKPT_DIR, the hub cache; never the demo), demo, or a hub id",
    )
    gen = parser.add_argument_group("generation", "defaults are the official Wan2.1 ones")
    run = parser.add_argument_group("placement")
    for name, field in GenerationParams.model_fields.items():
        if name in PLACEMENT_DEFAULTS:
            add_bool_flag(run, name, default=PLACEMENT_DEFAULTS[name], help=_with_default(name, PLACEMENT_DEFAULTS[name]))
        elif name == "lora":
            gen.add_argument("--lora", metavar="PATH", help=LORA_PATH_HELP)
        else:
            default = None if field.is_required() else field.default
            gen.add_argument(f"--{OFFICIAL_FLAG_NAMES.get(name, name)}", dest=name, help=_with_default(name, default))
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto = cuda when present")
    run.add_argument("--vae_dtype", choices=("float32", "bfloat16"), default="float32")
    run.add_argument("--attention", choices=ATTENTION_KERNELS, default="auto",
                     help="auto = FlashAttention-3 on a Hopper GPU where installed, else PyTorch SDPA")
    parser.add_argument("--save_file", help="output MP4 (default: t2v-1.3B_<size>_<prompt>_<time>.mp4 in the cwd)")
    return parser


def _with_default(name: str, default: object) -> str:
    """The flag's help, plus its default where there is one to show (the prompts have none)."""
    if default in (None, ""):
        return flag_help(name)
    shown = str(default).lower() if isinstance(default, bool) else default
    return f"{flag_help(name)} (default: {shown})"


def params_from_args(args: argparse.Namespace) -> GenerationParams:
    """The flags that were given, validated; absent ones take `GenerationParams`' defaults. A --lora path
    becomes the name it is loaded under."""
    given = {name: value for name, value in vars(args).items() if value is not None}
    if given.get("lora"):
        given["lora"] = CLI_ADAPTER
    return GenerationParams(**{name: given[name] for name in GenerationParams.model_fields if name in given})


def default_save_file(params: GenerationParams, now: datetime | None = None) -> Path:
    """The official generate.py's name, in the cwd, with `x` for `*` so the name is safe to type in a shell."""
    prompt = params.prompt.replace(" ", "_").replace("/", "_")[:50]
    stamp = (now or datetime.now()).strftime("%Y%m%d_%H%M%S")
    return Path(f"t2v-1.3B_{params.size.replace('*', 'x')}_{prompt}_{stamp}.mp4")


class PhaseProgress:
    """A tqdm bar on stderr per phase (denoise, decode), fed by `VideoModel.generate`'s on_progress."""

    def __init__(self):
        self.phase: str | None = None
        self.bar = None

    def __call__(self, phase: str, step: int, total: int) -> None:
        if phase != self.phase:
            self.close()
            self.phase = phase
            self.bar = tqdm(total=total, desc=phase, unit="step", file=sys.stderr)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> PhaseProgress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        params = params_from_args(args).with_seed()
    except ValidationError as error:
        parser.error(describe_errors(error))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    # Imported only once the flags are known good: torch + diffusers take seconds to import.
    import torch

    from pipeline.generator import VideoModel
    from pipeline.lora import LoraMismatchError, lora_file
    from pipeline.loading import (
        ModelNotFound,
        default_text_dtype,
        load_text_encoder,
        local_source,
        parse_dtype,
        resolve_device,
        resolve_model_source,
    )
    from pipeline.memory import MemoryPolicy
    from pipeline.text import PromptEncoder

    try:
        if args.ckpt_dir:
            source = local_source(Path(args.ckpt_dir), "--ckpt_dir")
        else:
            source = resolve_model_source(args.model, allow_demo=args.model == "demo")
        if args.lora:
            lora_file(args.lora)  # a wrong path fails now, not after the models have loaded
    except (ModelNotFound, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if source.is_demo:
        print(f"\n{'!' * 100}\n!!! {DEMO_BANNER}\n{'!' * 100}\n", file=sys.stderr)
    print(f"seed: {params.seed}", flush=True)

    device = resolve_device(args.device)
    text_device = torch.device("cpu") if params.t5_cpu else device
    tokenizer, encoder = load_text_encoder(source, text_device, default_text_dtype(source))
    prompts = PromptEncoder(tokenizer, encoder, text_device)
    context, negative_context = prompts.encode([params.prompt, params.effective_negative_prompt])
    del tokenizer, encoder, prompts  # freed before the DiT loads: peak memory holds one stage, not both

    policy = MemoryPolicy.from_offload_flag(params.offload_model)
    try:
        model = VideoModel.load(source, device, policy, parse_dtype(args.vae_dtype), attention=args.attention,
                                loras={CLI_ADAPTER: args.lora} if args.lora else None)
    except LoraMismatchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    with PhaseProgress() as progress:
        result = model.generate(params, context, negative_context, on_progress=progress,
                                video_path=args.save_file or default_save_file(params))
    path = result.video_path
    timings = ", ".join(f"{phase} {seconds:.1f}s" for phase, seconds in result.timings.items())
    print(f"saved: {path} ({len(result.frames)} frames, {params.size}, seed {params.seed}; {timings})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`wan-t2v convert ORIGINAL_DIR OUT_DIR`: an original Wan2.1 release folder as a diffusers-format folder.

The service loads either layout, but the release layout is re-mapped on every load and only this
project reads it; the converted folder is what diffusers' own `from_pretrained` (and every other
diffusers tool) reads. Nothing is rounded: the DiT and the VAE are written in float32, as the
release stores them, and the umT5 encoder in the dtype its `.pth` holds (bf16 in the release).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from diffusers import UniPCMultistepScheduler, WanPipeline

from pipeline import original
from pipeline.demo import save_diffusers_folder
from pipeline.loading import ModelNotFound, detect_layout

CPU = torch.device("cpu")


def wan_pipeline(tokenizer, text_encoder, transformer, vae) -> WanPipeline:
    """The parts with the scheduler Wan-AI's diffusers release ships (flow UniPC, shift 8)."""
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0)
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae, scheduler=scheduler
    )


def stored_dtype(path: Path) -> torch.dtype:
    """The widest floating dtype in a `.pth` state dict, read through a memory map (no data loaded)."""
    dtypes = {tensor.dtype for tensor in original.mapped_state(path).values() if tensor.is_floating_point()}
    return max(dtypes, key=lambda dtype: dtype.itemsize)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="wan-t2v convert", description="Write an original Wan2.1 release folder as a diffusers-format folder."
    )
    parser.add_argument("original_dir", type=Path, help="the release folder (config.json, Wan2.1_VAE.pth, ...)")
    parser.add_argument("out_dir", type=Path, help="where to write the diffusers folder; must not exist yet")
    args = parser.parse_args(argv)
    if args.out_dir.exists():
        parser.error(f"{args.out_dir} already exists; name a new folder")
    try:
        layout = detect_layout(args.original_dir)
    except ModelNotFound as error:
        parser.error(str(error))
    if layout != "original":
        parser.error(f"{args.original_dir} is already a diffusers folder")

    folder = args.original_dir
    tokenizer, text_encoder = original.load_text_encoder(folder, CPU, stored_dtype(folder / original.T5_WEIGHTS))
    pipe = wan_pipeline(
        tokenizer,
        text_encoder,
        original.load_transformer(folder, torch.float32),
        original.load_vae(folder, torch.float32),
    )
    save_diffusers_folder(pipe, args.out_dir, demo=False)
    print(f"wrote {args.out_dir} (diffusers layout) from {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The VAE decode and MP4 encode after the last step: layouts and x264 presets, on the GPU host.

Decodes random latents of the 832x480x81 shape with the bf16 Wan VAE (default, cuDNN autotune,
channels-last 3-D convolution weights, both) and encodes the decoded frames with libx264 at each
preset and two CRFs on the host's CPU. Writes `<out>/decode-encode-<date>.json` and `.md`.

Usage (on the GPU machine): python bench/decode_encode.py [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu import build_vae, synced  # noqa: E402

from pipeline.vae import channels_last_weights  # noqa: E402
from pipeline.video import decode_latents  # noqa: E402


def decode_variants(latents: torch.Tensor) -> tuple[dict, np.ndarray]:
    out, reference = {}, None
    for name, autotune, channels_last in (("default", False, False), ("cudnn_benchmark", True, False),
                                          ("channels_last", False, True), ("both", True, True)):
        torch.backends.cudnn.benchmark = autotune
        vae = build_vae(torch.bfloat16)
        if channels_last:
            channels_last_weights(vae)
        with torch.inference_mode():
            decode_latents(vae, latents)  # warm
            frames, first = synced(lambda: decode_latents(vae, latents, lambda _: None))
            _, second = synced(lambda: decode_latents(vae, latents, lambda _: None))
        reference = frames if reference is None else reference
        out[name] = {"s": [round(first, 3), round(second, 3)], "max_px_diff": int(np.abs(frames.astype(int) - reference).max())}
        del vae
        torch.cuda.empty_cache()
    torch.backends.cudnn.benchmark = False
    return out, reference


def encode_presets(frames: np.ndarray) -> dict:
    out = {}
    height, width = frames.shape[1:3]
    for preset in ("medium", "fast", "veryfast", "superfast", "ultrafast"):
        for crf in ("10", "18"):  # 10 = imageio's quality=8, what write_mp4 uses
            with tempfile.TemporaryDirectory() as folder:
                path = os.path.join(folder, "video.mp4")
                started = time.perf_counter()
                writer = imageio_ffmpeg.write_frames(
                    path, (width, height), fps=16, codec="libx264", pix_fmt_in="rgb24", pix_fmt_out="yuv420p",
                    quality=None, macro_block_size=16, ffmpeg_log_level="error",
                    output_params=["-crf", crf, "-preset", preset, "-movflags", "+faststart"])
                writer.send(None)
                for frame in frames:
                    writer.send(np.ascontiguousarray(frame))
                writer.close()
                out[f"x264_{preset}_crf{crf}"] = {"s": round(time.perf_counter() - started, 2), "bytes": os.path.getsize(path)}
    return out


def markdown(results: dict) -> str:
    lines = [f"# VAE decode and MP4 encode — {results['device']} host ({results['cpu_count']} CPU cores), {results['date']}", "",
             "| bf16 VAE decode, 81 frames | s (two runs) | max pixel difference vs default |", "| --- | --- | --- |"]
    lines += [f"| {name} | {run['s']} | {run['max_px_diff']} |" for name, run in results["vae_bf16_decode"].items()]
    lines += ["", "| libx264, 81 frames 832x480 | s | MB |", "| --- | --- | --- |"]
    lines += [f"| {name[5:]} | {run['s']} | {run['bytes'] / 1e6:.1f} |" for name, run in results["x264"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = parser.parse_args()
    latents = torch.randn(1, 16, 21, 60, 104, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    decode, frames = decode_variants(latents)
    results = {"device": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(), "cpu_count": os.cpu_count(),
               "frames": list(frames.shape), "vae_bf16_decode": decode, "x264": encode_presets(frames)}
    path = Path(args.out) / f"decode-encode-{results['date']}.json"
    path.write_text(json.dumps(results, indent=1))
    path.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()

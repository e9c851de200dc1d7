"""Latents -> pixels -> MP4.

The MP4 is H.264 / yuv420p at 16 fps with `+faststart` (plays in every browser while it downloads),
written under a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import torch

FPS = 16


@torch.inference_mode()
def decode_latents(vae, latents: torch.Tensor) -> np.ndarray:
    """[1, 16, T, h, w] latents -> uint8 frames [F, H, W, 3] (the VAE's own dtype and tiling apply)."""
    parameter = next(vae.parameters())
    latents = latents.to(parameter.device, parameter.dtype)
    z_dim = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(latents)
    std = torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(latents)
    video = vae.decode(latents * std + mean, return_dict=False)[0]  # [1, 3, F, H, W] in [-1, 1]
    video = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return video.permute(1, 2, 3, 0).contiguous().cpu().numpy()


def write_mp4(frames: np.ndarray, path: str | os.PathLike, fps: int = FPS) -> Path:
    """Encode uint8 frames [F, H, W, 3] to `path` atomically; returns the final path."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        # ffmpeg would take any bytes and cut them into frames: RGBA or float input gives a wrong video.
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_frames, height, width, _ = frames.shape
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".mp4", dir=path.parent)
    os.close(fd)
    writer = imageio_ffmpeg.write_frames(  # a generator: ffmpeg starts at the first send
        tmp_name,
        (width, height),
        fps=fps,
        codec="libx264",
        pix_fmt_in="rgb24",
        pix_fmt_out="yuv420p",
        quality=8,
        macro_block_size=16,
        output_params=["-movflags", "+faststart"],
        ffmpeg_log_level="error",
    )
    try:
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
        os.replace(tmp_name, path)
    except BaseException:
        writer.close()  # stop ffmpeg first: a running one can create the temp file again after the unlink
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def read_mp4(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Decode an MP4 to uint8 frames [F, H, W, 3] plus ffmpeg's metadata (size, fps, duration)."""
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3) for raw in reader]
    return np.stack(frames), meta

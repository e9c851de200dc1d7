"""Latents -> pixels -> MP4.

The MP4 is H.264 / yuv420p at 16 fps with `+faststart` (plays in every browser while it downloads),
written under a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import os
import queue
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import torch

FPS = 16

# imageio-ffmpeg starts ffmpeg with preexec_fn=os.setpgrp (to keep Ctrl-C from it), and a preexec_fn
# makes subprocess fork() the whole process. In a Ray replica, gRPC's threads make that unsafe: the
# child sometimes aborts before it becomes ffmpeg ("Other threads are currently calling into gRPC,
# skipping fork() handlers", then SIGABRT) and the write fails with "Broken pipe". Without it,
# subprocess uses vfork + exec, which runs nothing in the child. This is imageio-ffmpeg's own switch.
os.environ.setdefault("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "1")

FrameSink = Callable[[np.ndarray], None]  # takes uint8 frames [n, H, W, 3]


@torch.inference_mode()
def decode_latents(vae, latents: torch.Tensor, on_frames: FrameSink | None = None) -> np.ndarray:
    """[1, 16, T, h, w] latents -> uint8 frames [F, H, W, 3] (the VAE's own dtype and tiling apply).

    `on_frames` receives the frames as they are decoded (1, then 4 per latent frame), so an
    `Mp4Writer` encodes while the VAE still works; a tiled VAE hands them over once, at the end.
    """
    parameter = next(vae.parameters())
    latents = latents.to(parameter.device, parameter.dtype)
    z_dim = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(latents)
    std = torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(latents)
    latents = latents * std + mean
    if on_frames is None or vae.use_tiling or vae.config.patch_size is not None:
        frames = to_uint8_frames(vae.decode(latents, return_dict=False)[0])
        if on_frames is not None:
            on_frames(frames)
        return frames
    chunks = []
    copying = None  # the previous latent frame's pixels, on their way to the host
    for pixels in decode_by_latent_frame(vae, latents):
        # This frame's decode is queued before we wait for the previous one's copy, so the GPU has work
        # while the CPU waits and hands frames to the writer.
        previous, copying = copying, start_host_copy(pixels)
        if previous is not None:
            chunks.append(previous())
            on_frames(chunks[-1])
    chunks.append(copying())
    on_frames(chunks[-1])
    return np.concatenate(chunks)


def decode_by_latent_frame(vae, latents: torch.Tensor) -> Iterator[torch.Tensor]:
    """diffusers' `AutoencoderKLWan._decode` loop, yielding each latent frame's pixels [1, 3, f, H, W].

    The Wan VAE is causal in time and already decodes one latent frame at a time through its
    feature cache; `decode()` only concatenates at the end. Same calls, same order, same pixels.
    """
    from pipeline.diffusers_compat import decode_latent_frame  # diffusers: not for readers of MP4s

    vae.clear_cache()
    try:
        x = vae.post_quant_conv(latents)
        for i in range(latents.shape[2]):
            yield decode_latent_frame(vae, x, i).clamp(-1, 1)
    finally:
        vae.clear_cache()


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """[1, 3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3] on the CPU."""
    return start_host_copy(video)()


def start_host_copy(video: torch.Tensor) -> Callable[[], np.ndarray]:
    """Convert [1, 3, F, H, W] in [-1, 1] to uint8 [F, H, W, 3] and start moving it to the host.

    Returns the call that waits for the frames. From a GPU the copy goes to pinned memory without
    blocking, so the caller can queue more GPU work before it waits.
    """
    frames = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).contiguous()
    if frames.device.type != "cuda":
        return frames.numpy
    host = torch.empty(frames.shape, dtype=torch.uint8, pin_memory=True)
    host.copy_(frames, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(frames.device))

    def wait() -> np.ndarray:
        copied.synchronize()
        return host.numpy()

    return wait


class Mp4Writer:
    """An MP4 fed in pieces: ffmpeg encodes on a thread of its own while the caller produces frames.

    Atomic: the file appears under its name only when `close()` succeeds; on any error (or `abort()`)
    the temporary file is removed and an existing file at `path` is left as it was.
    """

    def __init__(self, path: str | os.PathLike, width: int, height: int, fps: int = FPS):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.shape = (height, width, 3)
        self.fps = fps
        fd, self._tmp_name = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=".mp4", dir=self.path.parent)
        os.close(fd)
        self._chunks: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._aborted = False
        self._thread = threading.Thread(target=self._encode, name=f"mp4-{self.path.stem}", daemon=True)
        self._thread.start()

    def add(self, frames: np.ndarray) -> None:
        """Queue uint8 frames [n, H, W, 3]; returns at once."""
        if frames.ndim != 4 or frames.shape[1:] != self.shape or frames.dtype != np.uint8:
            # ffmpeg would take any bytes and cut them into frames: RGBA or float input gives a wrong video.
            raise ValueError(f"frames must be uint8 [n, {', '.join(map(str, self.shape))}], got {frames.dtype} {list(frames.shape)}")
        self._chunks.put(frames)

    def close(self) -> Path:
        """Wait for ffmpeg to finish, then move the file into place; returns its path."""
        self._chunks.put(None)
        self._thread.join()
        if self._error is not None:
            Path(self._tmp_name).unlink(missing_ok=True)
            raise self._error
        os.replace(self._tmp_name, self.path)
        return self.path

    def abort(self) -> None:
        self._aborted = True
        self._chunks.put(None)
        self._thread.join()
        Path(self._tmp_name).unlink(missing_ok=True)

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, error_type, *_) -> None:
        if error_type is None:
            self.close()
        else:
            self.abort()

    def _encode(self) -> None:
        height, width, _ = self.shape
        writer = imageio_ffmpeg.write_frames(  # a generator: ffmpeg starts at the first send
            self._tmp_name,
            (width, height),
            fps=self.fps,
            codec="libx264",
            pix_fmt_in="rgb24",
            pix_fmt_out="yuv420p",
            quality=8,
            macro_block_size=16,
            # veryfast: several times faster than medium, files no larger (bench/results/decode-encode-2026-11-26.json).
            output_params=["-preset", "veryfast", "-movflags", "+faststart"],
            ffmpeg_log_level="error",
        )
        try:
            writer.send(None)
            while (frames := self._chunks.get()) is not None and not self._aborted:
                for frame in frames:
                    writer.send(np.ascontiguousarray(frame))
        except BaseException as error:  # noqa: BLE001 - handed to close()
            self._error = error
        finally:
            writer.close()  # stop ffmpeg before the temp file is unlinked: a running one can create it again


def write_mp4(frames: np.ndarray, path: str | os.PathLike, fps: int = FPS) -> Path:
    """Encode uint8 frames [F, H, W, 3] to `path` atomically; returns the final path."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    with Mp4Writer(path, frames.shape[2], frames.shape[1], fps) as writer:
        writer.add(frames)
    return writer.path


def read_mp4(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Decode an MP4 to uint8 frames [F, H, W, 3] plus ffmpeg's metadata (size, fps, duration)."""
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3) for raw in reader]
    return np.stack(frames), meta

"""The VAE decode as VideoModel runs it on a GPU: sped-up modules and per-latent-frame pinned host copies.

`decode_latents` hands frames to the MP4 writer as each latent frame is decoded (1, then 4 per latent
frame), copying them to pinned host memory without blocking, so the GPU decodes the next latent frame
while the host waits. pipeline/vae.py's speed-ups (padding inside the convolutions, channels-last
weights, bf16 upsampling; compiled norms with compile on) change only bf16 rounding. The real-size VAE
in bf16 (configs/single_gpu.yaml's vae_dtype) at 832x480: 5 latent frames, 17 frames.
"""

import copy

import numpy as np
import pytest
import torch

from pipeline.vae import compile_norms, speed_up_decode
from pipeline.video import decode_latents

from .helpers import build_vae

LATENTS = torch.randn(1, 16, 5, 60, 104, generator=torch.Generator().manual_seed(3))
FRAMES = (17, 480, 832, 3)
# bench/profile_gpu.py, the same speed-ups against the plain bf16 decode of random latents at 81 frames:
# max 7/255, mean 0.86/255. Twice that leaves room for other latents; a wrong frame, chunk or stale host
# buffer differs by tens of levels on average.
MAX_PIXEL_DIFFERENCE = 14
MEAN_PIXEL_DIFFERENCE = 1.5


@pytest.fixture(scope="module")
def plain():
    return build_vae(torch.bfloat16)


@pytest.fixture(scope="module")
def fast(plain):
    """What VideoModel decodes with on a GPU with compile on. One untimed decode first: compiled norms
    settle their graphs (one per shape, then a dynamic one) there, so later decodes run the same code."""
    vae = copy.deepcopy(plain)
    speed_up_decode(vae, channels_last=True)
    compile_norms(vae)
    decode_latents(vae, LATENTS)
    return vae


def whole_decode(vae, latents: torch.Tensor) -> np.ndarray:
    """diffusers' own decode of the whole video, then a blocking copy to the host: no per-frame path, no pinned memory."""
    parameter = next(vae.parameters())
    latents = latents.to(parameter.device, parameter.dtype)  # scaled in the VAE's dtype, as decode_latents does
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean, std = (torch.tensor(values).view(shape).to(latents) for values in (vae.config.latents_mean, vae.config.latents_std))
    with torch.inference_mode():
        video = vae.decode(latents * std + mean, return_dict=False)[0]
    return ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


def test_per_frame_pinned_copies_give_the_frames_of_a_whole_decode(fast):
    handed_over, snapshots = [], []

    def on_frames(frames: np.ndarray) -> None:
        handed_over.append(frames)
        snapshots.append(frames.copy())  # what the MP4 writer would read at this moment

    frames = decode_latents(fast, LATENTS, on_frames)
    assert frames.dtype == np.uint8 and frames.shape == FRAMES
    assert [len(chunk) for chunk in handed_over] == [1, 4, 4, 4, 4]
    assert all(torch.from_numpy(chunk).is_pinned() for chunk in handed_over)
    # Same module, same calls in the same order (decode_by_latent_frame is diffusers' _decode loop): exact.
    assert np.array_equal(frames, whole_decode(fast, LATENTS))
    assert np.array_equal(np.concatenate(snapshots), frames)  # each chunk's copy had finished when it was handed over
    assert np.array_equal(np.concatenate(handed_over), frames)  # and no later copy overwrote its buffer


def test_sped_up_decode_stays_within_bf16_rounding_of_the_plain_decode(plain, fast):
    fast_frames = decode_latents(fast, LATENTS, lambda frames: None)
    difference = np.abs(fast_frames.astype(np.int16) - whole_decode(plain, LATENTS).astype(np.int16))
    assert difference.max() <= MAX_PIXEL_DIFFERENCE, difference.max()
    assert difference.mean() < MEAN_PIXEL_DIFFERENCE, difference.mean()

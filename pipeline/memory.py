"""GPU memory policies for the DiT + VAE (the seed's `offload_model`, made an operator setting).

- resident: DiT and VAE live on the GPU. Fastest.
- offload:  the DiT lives on the CPU and visits the GPU only while denoising; the VAE decodes in the
            room that frees. The official `--offload_model True`.
- stream:   the DiT's blocks stream from pinned CPU memory on a side CUDA stream while the previous
            block computes (diffusers group offloading); the VAE decodes tiled. For small cards.

On a CPU device every policy places everything on the CPU; the policy is still selected and
reported, so the dispatch is the same code path everywhere.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)


class MemoryPolicy(str, enum.Enum):
    RESIDENT = "resident"
    OFFLOAD = "offload"
    STREAM = "stream"

    @classmethod
    def from_offload_flag(cls, offload_model: bool) -> MemoryPolicy:
        """The seed's boolean: True = the official offload behaviour, False = keep everything resident."""
        return cls.OFFLOAD if offload_model else cls.RESIDENT


class PlacedModels:
    """The DiT and VAE placed on a device according to a memory policy."""

    def __init__(self, transformer, vae, device: torch.device, policy: MemoryPolicy):
        self.transformer = transformer
        self.vae = vae
        self.device = device
        self.policy = MemoryPolicy(policy)
        self.on_gpu = device.type == "cuda"
        self._place()

    def _place(self) -> None:
        if not self.on_gpu:
            self.transformer.to(self.device)
            self.vae.to(self.device)
            return
        self.vae.to(self.device)
        if self.policy is MemoryPolicy.RESIDENT:
            self.transformer.to(self.device)
        elif self.policy is MemoryPolicy.OFFLOAD:
            self.transformer.to("cpu")
        elif self.policy is MemoryPolicy.STREAM:
            self.transformer.enable_group_offload(
                onload_device=self.device,
                offload_device=torch.device("cpu"),
                offload_type="block_level",
                num_blocks_per_group=1,
                use_stream=True,
                record_stream=True,
            )
            self.vae.enable_tiling()
        log.info("memory policy %s on %s", self.policy.value, self.device)

    def switch(self, policy: MemoryPolicy) -> None:
        """Change between resident and offload between jobs (a request's honoured offload_model).

        `stream` installs hooks at load time, so a stream replica keeps its policy.
        """
        policy = MemoryPolicy(policy)
        if policy is self.policy or MemoryPolicy.STREAM in (policy, self.policy):
            return
        self.policy = policy
        self._place()

    @contextlib.contextmanager
    def denoising(self) -> Iterator[None]:
        """Bring the DiT where it computes for the duration of the denoising loop."""
        visiting = self.on_gpu and self.policy is MemoryPolicy.OFFLOAD
        if visiting:
            self.transformer.to(self.device)
        try:
            yield
        finally:
            if visiting:
                self.transformer.to("cpu")
                torch.cuda.empty_cache()

    def describe(self) -> dict:
        return {"policy": self.policy.value, "device": str(self.device), "vae_tiled": bool(self.vae_tiled)}

    @property
    def vae_tiled(self) -> bool:
        return bool(getattr(self.vae, "use_tiling", False))

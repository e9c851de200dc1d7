"""GPU out-of-memory: the injected fault (off by default) and what a replica does after a real one."""

from __future__ import annotations

import gc

import torch


class OutOfMemoryInjector:
    """`generator.fault_injection`: the replica's 1st, (1+n)th, (1+2n)th ... job runs out of memory.

    The error is raised from the denoising loop's step callback, where a real one would surface, so
    the whole path (replica cleanup, the gateway's `out_of_memory` error, the next job) is exercised
    without a GPU. With every_nth_job > 1 the jobs in between prove that the replica recovered.
    """

    def __init__(self, out_of_memory_at_step: int, every_nth_job: int):
        self.at_step = out_of_memory_at_step
        self.every = every_nth_job
        self.jobs = 0

    def for_next_job(self):
        """A progress callback for the next job: raises at the step, or does nothing on a spared job."""
        self.jobs += 1
        if (self.jobs - 1) % self.every:
            return lambda phase, step, total: None

        def on_progress(phase: str, step: int, total: int) -> None:
            if phase == "denoise" and step == self.at_step:
                raise torch.OutOfMemoryError(f"CUDA out of memory (injected by generator.fault_injection at step {step})")

        return on_progress


def release_memory(device: torch.device) -> None:
    """After an out-of-memory error: drop the failed job's tensors and hand cached blocks back."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

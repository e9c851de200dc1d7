"""GPU out-of-memory: the injected fault (off by default) and what a replica does after a real one."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


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


def freeing_memory_on_oom(generate: Callable[[], T], device: torch.device) -> T:
    """Run `generate`; on out-of-memory, free what the failed job held before the error goes up.

    Only the message travels on: the original traceback's frames would keep the job's tensors alive
    through gc.collect() and empty_cache(), and the next job would start short of memory.
    """
    try:
        return generate()
    except torch.OutOfMemoryError as error:
        message = str(error)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    raise torch.OutOfMemoryError(message)

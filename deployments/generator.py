"""VideoGenerator deployment: DiT + VAE on one GPU per replica (or the CPU), under a memory policy.

`generate` is a streaming method: a progress event per denoising step and per phase, then the
encoded MP4. The model runs in a worker thread so the replica's event loop stays free; when the
caller goes away (client disconnect, timeout, job cancelled) the stream is cancelled, the thread
stops before its next step, and the replica takes the next job.
"""

from __future__ import annotations

import asyncio
import io
import logging
import tempfile
import threading
import time
from pathlib import Path

import ray
import torch
from PIL import Image
from ray import serve

from deployments.faults import OutOfMemoryInjector, freeing_memory_on_oom
from deployments.messages import EncodedText, GenerateJob, GenerationOutput, GeneratorSettings, ProgressEvent
from deployments.metrics import GeneratorMetrics
from deployments.replica_model import load_model, warm_up
from deployments.team import WorkerTeam
from pipeline.loading import ModelSource
from pipeline.memory import MemoryPolicy
from pipeline.startup import StartupPhases

log = logging.getLogger("ray.serve")


@serve.deployment(max_ongoing_requests=1, graceful_shutdown_timeout_s=30)
class VideoGenerator:
    def __init__(self, source: ModelSource, settings: GeneratorSettings):
        """The replica reports ready (its __init__ returns) only once its first job will run as fast as
        any later one: weights loaded and placed, compiled code loaded or compiled, warmed.
        `settings.fault_injection`: OutOfMemoryInjector's arguments, for tests and drills only.
        """
        self.startup = StartupPhases()
        # Started first: the workers load their copies of the model while this replica loads its own.
        self.team = WorkerTeam(source, settings) if settings.team is not None else None
        self.model = load_model(source, settings, self.startup)
        if self.team is None:
            warm_up(self.model, settings, self.startup)
        else:
            with self.startup.phase("join_team"):
                self.team.together(lambda: self.model.split_across(self.team.join(self.model.device)), "join")
            self.team.together(lambda: warm_up(self.model, settings, self.startup), "warm_up")
            self.team.ready()
        # One generation at a time per replica, also while a cancelled one finishes its current step.
        self._running = threading.Lock()
        self.faults = OutOfMemoryInjector(**settings.fault_injection) if settings.fault_injection else None
        self.metrics = GeneratorMetrics()
        log.info("VideoGenerator %s", self.startup.done())

    async def generate(self, job: GenerateJob):
        """Yields a ProgressEvent per step and phase, then the GenerationOutput.

        The job's references are to TextEncoder.encode results, possibly still being computed: the
        negative prompt's is waited for first, the prompt's only after step 1's unconditional pass.
        """
        params = job.params
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[ProgressEvent] = asyncio.Queue()
        cancelled = threading.Event()
        observers = [self.metrics.step_timer()] + ([self.faults.for_next_job()] if self.faults else [])

        def on_progress(phase: str, step: int, total: int) -> None:
            for observe in observers:
                observe(phase, step, total)
            loop.call_soon_threadsafe(events.put_nowait, ProgressEvent(phase=phase, step=step, total=total))

        def run() -> GenerationOutput:
            with self._running:
                on_progress("denoise", 0, params.sample_steps)  # this replica has the job: the GPU starts now
                self.model.models.switch(MemoryPolicy(job.memory_policy))
                waited = time.perf_counter()
                negative = _encoded(job.negative_context)
                negative_wait = time.perf_counter() - waited
                prompt: list[EncodedText] = []

                def prompt_embeddings() -> torch.Tensor:
                    prompt.append(_encoded(job.context))
                    return prompt[0].embeddings

                with tempfile.TemporaryDirectory(prefix="wan-t2v-") as folder:
                    def video():
                        return self.model.generate(params, prompt_embeddings, negative.embeddings,
                                                   on_progress, cancelled.is_set, video_path=Path(folder) / "video.mp4")

                    if self.team is not None:  # the workers denoise the same job in step
                        result = freeing_memory_on_oom(lambda: self.team.together(video, "run", job), self.model.device)
                    else:
                        result = freeing_memory_on_oom(video, self.model.device)
                    mp4 = result.video_path.read_bytes()
                log.info("generated %d frames at %s, %d steps, in %.1fs", result.frames.shape[0], params.size, params.sample_steps, sum(result.timings.values()))
                # The encoders' own times and every wait for them: the gateway never fetches the
                # embeddings (see deployments.job_runner), so they travel to it from here as numbers.
                timings = {"text_encode": prompt[0].seconds, "negative_text_encode": negative.seconds,
                           "negative_prompt_wait": negative_wait, **result.timings}
                return GenerationOutput(mp4=mp4, thumbnail=_jpeg(result.frames[0]), frames=int(result.frames.shape[0]),
                                        timings=timings, peak_gpu_bytes=result.peak_gpu_bytes,
                                        memory_policy=self.model.policy.value, device=str(self.model.device))

        work = asyncio.ensure_future(asyncio.to_thread(run))
        try:
            while True:
                next_event = asyncio.ensure_future(events.get())
                await asyncio.wait({next_event, work}, return_when=asyncio.FIRST_COMPLETED)
                if next_event.done():
                    yield next_event.result()
                    continue
                next_event.cancel()
                while not events.empty():
                    yield events.get_nowait()
                yield work.result()  # re-raises the generation's error, if any
                return
        finally:
            if not work.done():
                cancelled.set()  # the caller went away: stop before the next step
                work.add_done_callback(_log_unless_cancelled)

    def describe(self) -> dict:
        """Placement and policy of this replica; also the readiness probe."""
        return {
            "device": str(self.model.device),
            "memory_policy": self.model.policy.value,
            "attention": self.model.attention,
            "ray_gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()],
            "busy": self._running.locked(),
            "startup": self.startup.report(),
            "team": None if self.team is None else self.team.describe(),
        }

    async def check_health(self) -> None:
        """Serve's health check: a replica whose team lost a worker is replaced, workers and all."""
        if self.team is not None:
            await self.team.check()


def _encoded(encoded: ray.ObjectRef) -> EncodedText:
    """TextEncoder.encode's result: blocks this worker thread until it is done
    (unpickled here, on the calling thread); its error, if any, is the job's."""
    return ray.get(encoded)


def _log_unless_cancelled(work: asyncio.Future) -> None:
    """The end of a generation whose caller went away: its GenerationCancelled is the expected end
    (left unread, asyncio would log it as a lost error); any other error still goes to the log."""
    from pipeline.sampler import GenerationCancelled  # loaded by now: a generation ran

    error = None if work.cancelled() else work.exception()
    if error is not None and not isinstance(error, GenerationCancelled):
        log.error("a generation whose caller went away failed: %s: %s", type(error).__name__, error)


def _jpeg(frame) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()

"""The job runner: claims queued jobs, runs each on the two model stages, records progress, and ends
every job as completed, failed or queued again; a dead replica's jobs are recovered.

One runner loop per generator replica the cluster may have (`concurrent_jobs`), so jobs start in
submission order across all gateway replicas; a lease, renewed while the job runs, hands a stuck
replica's job to another.
"""

import asyncio
import logging
import time
from typing import Any

from deployments.job_board import JobBoard
from deployments.messages import GenerateJob, GenerationOutput, JobWork
from deployments.metrics import GatewayMetrics
from deployments.serve_compat import get_replica_actor, object_ref, set_request_id

log = logging.getLogger("ray.serve")

RECOVER_EVERY_S = 5.0  # how often a gateway looks for jobs left running by a dead replica
PROGRESS_SHARE = {"text_encode": 2, "denoise": 93, "decode": 4, "write": 1}  # % of the bar per phase


def progress_percent(phase: str, step: int, total: int) -> int:
    """The bar moves with real steps: denoising owns most of it, the other phases their slices."""
    done = 0
    for name, share in PROGRESS_SHARE.items():
        if name == phase:
            return min(100, int(done + share * (step / total if total else 0)))
        done += share
    return 0


def classify_error(error: Exception) -> tuple[str, str]:
    """A job error code and a message a user can act on."""
    text = f"{type(error).__name__}: {error}"
    if "OutOfMemoryError" in text or "out of memory" in text.lower():
        return "out_of_memory", "the GPU ran out of memory; use memory_policy 'stream' or a smaller size / frame_num"
    if any(name in text for name in ("ActorDiedError", "ActorUnavailableError", "RayActorError", "DeploymentUnavailableError", "ActorDied")):
        return "stage_unavailable", f"a model replica died while running this job ({type(error).__name__})"
    return "generation_error", text[:500]


def replica_alive(owner: str) -> bool:
    """Whether the gateway replica named in a lease owner ("<actor name>/<runner>") still exists.

    Serve replicas are named actors that Ray never restarts, so a name that no longer resolves
    means the replica is gone for good and its jobs can run again without waiting out the lease.
    All gateways sharing an output_dir must therefore live in one Ray cluster.
    """
    try:
        get_replica_actor(owner.rsplit("/", 1)[0])
    except ValueError:
        return False
    except Exception:  # noqa: BLE001 - unsure (e.g. GCS unreachable): leave it to the lease
        log.exception("checking lease owner %s failed", owner)
    return True


def _rounded(timings: dict[str, float]) -> dict[str, float]:
    return {name: round(seconds, 4) for name, seconds in timings.items()}


class JobRunner:
    def __init__(self, board: JobBoard, encoders: dict, generator, metrics: GatewayMetrics, owner: str,
                 lease_seconds: float, max_attempts: int, concurrent_jobs: int):
        self.board, self.store = board, board.store
        self.encoders, self.generator, self.metrics = encoders, generator, metrics
        self.owner = owner  # this replica's actor name: what replica_alive looks up
        self.lease_seconds, self.max_attempts, self.concurrent_jobs = lease_seconds, max_attempts, concurrent_jobs
        self.wakeup = asyncio.Event()  # a job was queued
        self.running: dict[str, Any] = {}  # job id -> generator stream, to cancel at once

    def start(self) -> list[asyncio.Task]:
        loop = asyncio.get_event_loop()
        return [loop.create_task(self._recover()), *(loop.create_task(self._claim_loop(i)) for i in range(self.concurrent_jobs))]

    def stop_running(self, job_id: str) -> None:
        """Cancel the job's generator stream if this replica runs it: the GPU is free within a step."""
        stream = self.running.get(job_id)
        if stream is not None:
            stream.cancel()

    async def _recover(self) -> None:
        """Requeue jobs whose runner's replica died (a crash, a restart), at start and then now and then."""
        while True:
            try:
                # Not on the store's thread: looking up owners waits on Ray's GCS.
                requeued = await asyncio.to_thread(self.store.requeue_orphans, replica_alive)
                self.metrics.pending.set(await self.board.call(self.store.count, "queued"))  # also while every runner is busy
            except Exception:  # noqa: BLE001 - a locked database must not end recovery
                log.exception("looking for orphaned jobs failed")
                requeued = []
            if requeued:
                log.warning("queued again %d job(s) left running by a replica that is gone: %s", len(requeued), ", ".join(requeued))
                self.wakeup.set()
                self.board.notify()
            await asyncio.sleep(RECOVER_EVERY_S)

    async def _claim_loop(self, index: int) -> None:
        owner = f"{self.owner}/{index}"
        while True:
            try:
                claimed = await self.board.call(self.store.claim, owner, self.lease_seconds, self.concurrent_jobs)
                self.metrics.pending.set(await self.board.call(self.store.count, "queued"))
            except Exception:  # noqa: BLE001 - a locked database must not kill the runner
                log.exception("claiming a job failed")
                claimed = None
            if claimed is None:
                self.wakeup.clear()
                try:
                    await asyncio.wait_for(self.wakeup.wait(), timeout=1.0)
                except asyncio.TimeoutError:
                    pass
                continue
            job, work = claimed[0], JobWork.model_validate(claimed[1])
            self.board.notify()
            if job["attempts"] > self.max_attempts:
                await self._progress(job["id"], owner, status="failed", phase="failed", completed_at=int(time.time()),
                                     error={"code": "attempts_exhausted", "message": f"gave up after {self.max_attempts} attempts"})
                continue
            await asyncio.create_task(self._run(job, work, owner))  # a task of its own: the job's request id stays with it

    async def _progress(self, job_id: str, owner: str, **fields: Any) -> bool:
        """Record a change of a job this runner holds; False when it is no longer ours (cancelled, deleted)."""
        changed = await self.board.call(self.store.update, job_id, owner, **fields) is not None
        if changed and "status" in fields:
            self.metrics.job("retried" if fields["status"] == "queued" else fields["status"])
        self.board.notify()
        return changed

    async def _run(self, job: dict, work: JobWork, owner: str) -> None:
        job_id = job["id"]
        # The runner works outside any request: the job's request id goes with the stage calls, and
        # Serve writes it on every line they log, in all three replicas.
        set_request_id(job["request_id"])
        renewal = asyncio.get_running_loop().create_task(self._renew(job_id, owner))
        started = time.time()
        timings = {"queue": started - work.submitted_at}
        try:
            if not await self._progress(job_id, owner, phase="text_encode"):
                return
            # The generator gets references to the two encodes, not their results, and starts at once:
            # step 1's unconditional pass needs only the negative prompt (nearly always cached) and
            # runs while the prompt is still encoding. The gateway never awaits these references: that
            # would unpickle the embeddings (torch tensors) here, on Ray's core-worker I/O thread, where
            # with torch 2.11 it deadlocked the whole process on the GIL (tests/test_gateway_stall.py).
            # The encode times come back with the generator's result.
            encoder = self.encoders[job["text_encoder"]]
            prompt = await object_ref(encoder.encode.remote(job["prompt"]))
            negative = await object_ref(encoder.encode.remote(work.negative_prompt))
            stream = self.generator.options(stream=True).generate.remote(
                GenerateJob(params=work.params, memory_policy=work.memory_policy, context=prompt, negative_context=negative)
            )
            self.running[job_id] = stream
            result = None
            async for event in stream:
                if isinstance(event, GenerationOutput):
                    result = event
                    continue
                step = event.step if event.phase == "denoise" else job["total_steps"]
                if not await self._progress(job_id, owner, phase=event.phase, step=step, progress=progress_percent(event.phase, event.step, event.total)):
                    stream.cancel()  # cancelled or deleted elsewhere
                    return
            timings.update(result.timings)
            await self._complete(job_id, owner, result, timings)
            log.info("job %s completed in %.1fs (request %s)", job_id, time.time() - started, job["request_id"])
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - every failure ends in the job, never in a lost job
            await self._fail_or_retry(job, owner, error)
        finally:
            self.running.pop(job_id, None)
            renewal.cancel()

    async def _complete(self, job_id: str, owner: str, result: GenerationOutput, timings: dict[str, float]) -> None:
        """Files first, then the row: a job is never "completed" without its whole video on disk."""
        current = await self.board.call(self.store.get, job_id)
        if current is None or current["status"] != "in_progress":
            return
        final = {"status": "completed", "phase": "completed", "progress": 100, "step": current["total_steps"],
                 "completed_at": int(time.time()), "timings": _rounded(timings),
                 "memory_policy": result.memory_policy, "peak_gpu_memory_bytes": result.peak_gpu_bytes}
        await asyncio.to_thread(self.store.write_result, {**current, **final}, result.mp4, result.thumbnail)
        if await self._progress(job_id, owner, **final):
            self.metrics.completed(timings, result.peak_gpu_bytes)
        else:
            latest = await self.board.call(self.store.get, job_id)
            if latest is None or latest["status"] == "cancelled":
                await asyncio.to_thread(self.store.delete_files, job_id)  # cancelled while the files were written

    async def _fail_or_retry(self, job: dict, owner: str, error: Exception) -> None:
        code, message = classify_error(error)
        current = await self.board.call(self.store.get, job["id"])
        if current is None or current["status"] != "in_progress":
            return  # cancelled or deleted: the stream's error is the cancellation itself
        if code == "stage_unavailable" and job["attempts"] < self.max_attempts:
            log.warning("job %s attempt %d failed (%s); queued again", job["id"], job["attempts"], message)
            await self._progress(job["id"], owner, status="queued", phase="queued", step=0, progress=0)
            return
        if code == "stage_unavailable":
            message += f"; gave up after {job['attempts']} of max_attempts = {self.max_attempts}"
        log.error("job %s failed: %s (request %s)", job["id"], message, job["request_id"])
        await self._progress(job["id"], owner, status="failed", phase="failed", completed_at=int(time.time()), error={"code": code, "message": message})

    async def _renew(self, job_id: str, owner: str) -> None:
        """Keep the lease while the job runs; if it is gone (cancelled elsewhere), stop the stream."""
        while True:
            await asyncio.sleep(max(self.lease_seconds / 3, 0.2))
            if not await self.board.call(self.store.renew, job_id, owner, self.lease_seconds):
                self.stop_running(job_id)
                return

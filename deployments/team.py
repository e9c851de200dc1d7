"""A generator replica's team: one video's DiT on several GPUs (`generator.parallel`, pipeline/parallel.py).

The replica reserves its GPUs as one placement group (Serve's `placement_group_bundles`, one bundle
per rank) and is rank 0, in bundle 0. It starts a `TeamWorker` actor in each other bundle; they load
their copy of the model while the replica loads its own, join a process group at the replica's
address (NCCL on GPUs, gloo on CPUs) and from then on run every call together: rank 0 decodes and
streams, the workers denoise in step (`VideoModel.follow`).

A worker that dies or fails mid-job leaves the others waiting in a collective that will never
complete. The replica then exits at once: its job fails as `stage_unavailable` (the gateway runs it
again) and Serve replaces the whole replica; the workers, its children, die with it. Between jobs,
Serve's health check finds a lost worker the same way.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import TypeVar

import ray
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from deployments.messages import GenerateJob, GeneratorSettings, TeamSettings
from deployments.replica_model import load_model, warm_up
from pipeline.loading import ModelSource
from pipeline.parallel import ParallelLayout, join
from pipeline.startup import StartupPhases

log = logging.getLogger("ray.serve")

T = TypeVar("T")

# How long the ranks of a healthy team may end one call apart: a failure that every rank meets (a
# cancelled job, a bad parameter) reaches them all within a step; past this, one is stuck in a collective.
IN_STEP_S = 60.0
PING_TIMEOUT_S = 10.0


def layout_of(team: TeamSettings) -> ParallelLayout:
    return ParallelLayout(cfg=team.cfg, ulysses=team.ulysses, ring=team.ring)


@ray.remote(max_concurrency=2)  # `ping` answers while `run` works
class TeamWorker:
    """Rank 1 and up of a replica's team: its own copy of the DiT on its own GPU."""

    def __init__(self, source: ModelSource, settings: GeneratorSettings, rank: int, address: str):
        self.settings, self.rank, self.address = settings, rank, address
        self.startup = StartupPhases()
        self.model = load_model(source, settings, self.startup)

    def join(self) -> None:
        self.model.split_across(join(layout_of(self.settings.team), self.rank, self.address, self.model.device))

    def warm_up(self) -> None:
        warm_up(self.model, self.settings, self.startup)
        self.startup.done()

    def run(self, job: GenerateJob) -> None:
        """This rank's part of `job`: the embeddings from the encoders' results, then the denoising in step."""
        negative = ray.get(job.negative_context)
        self.model.follow(job.params, lambda: ray.get(job.context).embeddings, negative.embeddings)

    def ping(self) -> dict:
        return {"rank": self.rank, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), "gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()], "startup": self.startup.report()}


class WorkerTeam:
    """Rank 0's side: starts the workers in this replica's placement group and runs calls with them."""

    def __init__(self, source: ModelSource, settings: GeneratorSettings):
        team = settings.team
        self.layout = layout_of(team)
        group = ray.util.get_current_placement_group()
        if group is None and self.layout.world_size > 1:
            raise RuntimeError("generator.parallel needs the replica in a placement group (deployments.app sets placement_group_bundles)")
        self.address = f"tcp://{ray.util.get_node_ip_address()}:{free_port()}"
        self.workers = [
            TeamWorker.options(
                num_cpus=team.num_cpus, num_gpus=team.num_gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank),
            ).remote(source, settings, rank, self.address)
            for rank in range(1, self.layout.world_size)
        ]
        self.members: list[dict] = []
        log.info("team %s: rank 0 here, %d workers starting, process group at %s",
                 self.layout.describe(), len(self.workers), self.address)

    def join(self, device):
        """Join the process group as rank 0 (in `together` with the workers' `join`)."""
        return join(self.layout, 0, self.address, device)

    def together(self, own: Callable[[], T], method: str, *args) -> T:
        """Call `method(*args)` on every worker and `own()` here: parts of one SPMD call that meet in
        collectives. Returns `own`'s result or raises its error; if the team falls out of step (a
        worker dies or fails alone, or does not end with rank 0), this process exits (see the module)."""
        parts = [getattr(worker, method).remote(*args) for worker in self.workers]
        done = threading.Event()
        threading.Thread(target=self._watch, args=(parts, done, method), daemon=True, name=f"team-{method}").start()
        try:
            return own()
        finally:
            done.set()
            self._settle(parts, method)

    def _watch(self, parts: list[ray.ObjectRef], done: threading.Event, method: str) -> None:
        """While rank 0's part runs: a worker whose part failed leaves it waiting, unless it fails the same way."""
        pending = parts
        while pending and not done.is_set():
            ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)
            for part in ready:
                error = _error_of(part)
                if isinstance(error, RayActorError) or (error is not None and not done.wait(IN_STEP_S)):
                    _abandon(f"a worker's {method} failed while rank 0's ran: {error}")

    def _settle(self, parts: list[ray.ObjectRef], method: str) -> None:
        """After rank 0's part: every worker's must have ended too, and none by dying."""
        ready, pending = ray.wait(parts, num_returns=len(parts), timeout=IN_STEP_S)
        if pending:
            _abandon(f"{len(pending)} worker(s) still in {method} {IN_STEP_S:.0f}s after rank 0's part ended")
        for part in ready:
            error = _error_of(part)
            if isinstance(error, RayActorError):
                _abandon(f"a worker died during {method}: {error}")

    async def check(self) -> None:
        """Every worker answers: Serve's health check (a lost worker fails it, and the replica is replaced)."""
        import asyncio

        await asyncio.wait_for(asyncio.gather(*(worker.ping.remote() for worker in self.workers)), PING_TIMEOUT_S)

    def ready(self) -> None:
        """Note each worker's GPU and start-up, for /readyz (called once the team has warmed up)."""
        self.members = ray.get([worker.ping.remote() for worker in self.workers], timeout=PING_TIMEOUT_S)

    def describe(self) -> dict:
        return {**self.layout.describe(), "address": self.address, "workers": self.members}


def _error_of(part: ray.ObjectRef) -> Exception | None:
    try:
        ray.get(part)
    except Exception as error:  # noqa: BLE001 - any error is the part's outcome
        return error
    return None


def _abandon(why: str) -> None:
    """The team is out of step and cannot be trusted with another job: end this replica (Serve starts a new one)."""
    log.error("generator team out of step, replica exits so that Serve replaces it: %s", why)
    os._exit(1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]

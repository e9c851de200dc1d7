"""/readyz while a job runs: the generator answers no probe until its video is done, so the gateway
judges it by the job's progress: busy and ready while the job moves, not ready once it stands still."""

import asyncio
from types import SimpleNamespace

from deployments import jobs
from deployments.gateway import Gateway
from deployments.job_board import JobBoard
from deployments.jobs import JobStore, new_job_id


def gateway_on(store: JobStore, stalled_job_s: float):
    """The deployment's class, with only what its readiness judgement reads (no Serve, no models)."""
    gateway = object.__new__(Gateway.func_or_class)
    gateway.board, gateway.store, gateway.settings = JobBoard(store), store, SimpleNamespace(stalled_job_s=stalled_job_s)
    return gateway


def test_a_generator_without_an_answer_is_busy_while_its_job_moves_and_not_ready_once_it_stalls(tmp_path, monkeypatch):
    store = JobStore(tmp_path)
    gateway = gateway_on(store, stalled_job_s=60)
    assert asyncio.run(gateway._generator_busy()) is None  # no job runs: a missing answer is just a timeout

    clock = [1000.0]
    monkeypatch.setattr(jobs.time, "time", lambda: clock[0])
    job = {"id": new_job_id(), "status": "queued", "phase": "queued", "step": 0, "progress": 0, "created_at": 1000}
    store.create(job, {"params": {}}, max_pending=10)
    store.claim("gateway/0", 3600, capacity=1)
    clock[0] = 1059.0
    assert asyncio.run(gateway._generator_busy())["busy"] is True

    clock[0] = 1061.0
    stalled = asyncio.run(gateway._generator_busy())
    assert "error" in stalled and "61 s" in stalled["error"] and "gateway.stalled_job_s = 60" in stalled["error"]

    store.update(job["id"], "gateway/0", step=1)  # the job moves again: ready again
    assert asyncio.run(gateway._generator_busy())["busy"] is True

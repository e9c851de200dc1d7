"""Faults with real Ray, each bounded in time: model replicas SIGKILLed mid-job and an injected GPU
out-of-memory error. A job survives a fault by running again, up to max_attempts (2 here); past
that, or on out-of-memory, it ends `failed` with an error that says why; no job is ever lost, and
the service serves the next job."""

import time

import pytest
import ray
from ray import serve

from conftest import deploy, kill_replicas, tiny_args
from video_jobs import finished, poll, submit

APP = "faults"
ATTEMPTS = 2
# Each encode waits this long for its batch to fill: a window in which the encoder holds the job.
ENCODE_HOLD_S = 2.0


@pytest.fixture(scope="module")
def faults_app(serve_instance, tmp_path_factory):
    args = tiny_args(tmp_path_factory.mktemp(APP), max_attempts=ATTEMPTS,
                     cpu_text_encoder={"max_batch_size": 8, "batch_wait_timeout_s": ENCODE_HOLD_S})
    app = deploy(serve_instance, APP, args)
    yield app
    serve.delete(APP)


def running_in(stage: str, attempt: int):
    """A poll condition: the given attempt of the job is inside the stage (two steps in, for the generator)."""
    if stage == "TextEncoderCPU":
        return lambda job: job["attempts"] == attempt and job["phase"] == "text_encode"
    return lambda job: job["attempts"] == attempt and job["phase"] == "denoise" and job["step"] >= 2


def kill_during(client, job_id: str, stage: str, attempt: int) -> None:
    poll(client, job_id, running_in(stage, attempt), timeout=60)
    if stage == "TextEncoderCPU":
        time.sleep(ENCODE_HOLD_S / 4)  # the encode call has reached the replica and waits for its batch
    assert kill_replicas(APP, stage) == 1


@pytest.mark.parametrize("stage", ["VideoGenerator", "TextEncoderCPU"])
def test_a_job_survives_its_stage_dying_under_it(faults_app, stage):
    with faults_app.client() as client:
        job = submit(client, prompt=f"{stage} dies once", sample_steps=30)
        kill_during(client, job["id"], stage, attempt=1)
        done = poll(client, job["id"], finished, timeout=120)
        assert (done["status"], done["attempts"], done["error"]) == ("completed", 2, None)


def test_a_job_fails_clearly_once_max_attempts_are_spent(faults_app):
    """Deaths in either stage count toward one limit: the encoder dies under the first attempt (while
    the prompt, new to it, waits for its batch), the generator under the second (each stage's
    replacement has just started, so both must serve the next job)."""
    with faults_app.client() as client:
        job = submit(client, prompt="every attempt dies", sample_steps=30)
        for attempt, stage in enumerate(("TextEncoderCPU", "VideoGenerator")[:ATTEMPTS], start=1):
            kill_during(client, job["id"], stage, attempt)
        failed = poll(client, job["id"], finished, timeout=120)
        assert failed["status"] == "failed" and failed["attempts"] == ATTEMPTS
        assert failed["error"]["code"] == "stage_unavailable"
        assert "replica died" in failed["error"]["message"] and f"gave up after {ATTEMPTS} of max_attempts = {ATTEMPTS}" in failed["error"]["message"]

        after = submit(client, prompt="after the faults")
        assert poll(client, after["id"], finished, timeout=120)["status"] == "completed"


def test_the_generator_starts_while_the_prompt_is_still_encoding(faults_app):
    """A cached negative prompt is answered at once and a new prompt waits ENCODE_HOLD_S for its
    batch: the generator has the job meanwhile, runs step 1's unconditional pass, then waits."""
    with faults_app.client() as client:
        assert poll(client, submit(client, prompt="caches the negative prompt", sample_steps=1)["id"], finished, timeout=60)["status"] == "completed"
        job = poll(client, submit(client, prompt="a prompt the encoder holds", sample_steps=2)["id"], finished, timeout=60)
    assert job["status"] == "completed"
    assert job["timings"]["text_encode"] >= ENCODE_HOLD_S * 0.9
    assert job["timings"]["prompt_wait"] >= ENCODE_HOLD_S / 2
    assert job["timings"]["negative_prompt_wait"] < ENCODE_HOLD_S / 2  # the cached negative prompt: no wait


def generator_replicas(app: str) -> list[str]:
    return sorted(actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
                  if actor["name"].startswith(f"SERVE_REPLICA::{app}#VideoGenerator"))


def test_gpu_out_of_memory_fails_the_job_with_advice_and_the_replica_recovers(serve_instance, tmp_path_factory):
    app_name = "oom"
    injection = {"out_of_memory_at_step": 2, "every_nth_job": 2}  # the replica's 1st, 3rd, ... job
    app = deploy(serve_instance, app_name, tiny_args(tmp_path_factory.mktemp(app_name), generator={"fault_injection": injection}))
    try:
        replicas = generator_replicas(app_name)
        with app.client() as client:
            hit = poll(client, submit(client, prompt="runs out of memory", sample_steps=4)["id"], finished)
            assert (hit["status"], hit["attempts"]) == ("failed", 1)  # not retried: it would fail again
            assert hit["error"]["code"] == "out_of_memory"
            assert "memory_policy 'stream'" in hit["error"]["message"] and "smaller size" in hit["error"]["message"]
            spared = poll(client, submit(client, prompt="the next job")["id"], finished)
            assert spared["status"] == "completed"
        assert generator_replicas(app_name) == replicas  # the same replica served it: it recovered, not restarted
    finally:
        serve.delete(app_name)

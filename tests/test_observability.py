"""Observability over real Ray: a job's request id in its object, its response and every stage's
log file, and the service's Prometheus metrics on Ray's metrics export port after a job."""

import re
import time
import uuid
from pathlib import Path

import httpx
import ray

from video_jobs import CHEAP, poll, submit

METRICS = (
    "ray_wan_t2v_jobs_total",
    "ray_wan_t2v_pending_jobs",
    "ray_wan_t2v_denoise_step_seconds_count",
    "ray_wan_t2v_generation_seconds_count",
    "ray_wan_t2v_text_encode_seconds_count",
    "ray_wan_t2v_prompt_cache_hits_total",
    "ray_wan_t2v_prompt_cache_misses_total",
)


def replica_logs(app: str, deployment: str) -> str:
    folder = Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve"
    files = sorted(folder.glob(f"replica_{app}_{deployment}_*.log"))
    assert files, f"no log file of {deployment} in {folder}"
    return "".join(path.read_text(errors="replace") for path in files)


def samples(text: str) -> dict[tuple[str, str], float]:
    """(metric name, `phase`/`status` tag or "") -> value, summed over replicas and other tags."""
    values: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        match = re.match(r"^(ray_wan_t2v_\w+)\{(.*)\} (\S+)$", line)
        if match:
            tag = re.search(r'(?:phase|status)="(\w+)"', match[2])
            key = (match[1], tag[1] if tag else "")
            values[key] = values.get(key, 0.0) + float(match[3])
    return values


def test_the_request_id_follows_the_job_into_every_stage(tiny_app):
    request_id = f"obs-{uuid.uuid4().hex}"
    with tiny_app.client() as client:
        response = client.post("/v1/videos", json={"prompt": "a traced fox", **CHEAP}, headers={"X-Request-ID": request_id})
        assert response.status_code == 202 and response.headers["x-request-id"] == request_id
        job = poll(client, response.json()["id"], lambda job: job["status"] == "completed")
        assert job["request_id"] == request_id

        response = client.post("/v1/videos", json={"prompt": "no id given", **CHEAP})  # Serve makes one up
        assert response.status_code == 202 and response.json()["request_id"] == response.headers["x-request-id"]

    for deployment in ("Gateway", "TextEncoderCPU", "VideoGenerator"):
        lines = [line for line in replica_logs(tiny_app.name, deployment).splitlines() if request_id in line]
        assert lines, f"{deployment}: no log line carries {request_id}"
    encoder = replica_logs(tiny_app.name, "TextEncoderCPU")
    generator = replica_logs(tiny_app.name, "VideoGenerator")
    assert re.search(rf"{request_id}.*encoded \d+ tokens", encoder)
    assert re.search(rf"{request_id}.*generated 5 frames", generator)


def test_metrics_are_scraped_from_rays_export_port(tiny_app, metrics_port):
    with tiny_app.client() as client:
        for job in [submit(client, prompt="a measured fox") for _ in range(2)]:  # the second one's prompts are cached
            poll(client, job["id"], lambda job: job["status"] == "completed")
    deadline = time.monotonic() + 30
    while True:
        values = samples(httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text)
        names = {name for name, _ in values}
        if set(METRICS) <= names and values.get(("ray_wan_t2v_jobs_total", "completed"), 0) >= 1:
            break
        assert time.monotonic() < deadline, f"missing after 30 s: {sorted(set(METRICS) - names)}"
        time.sleep(1)
    assert values[("ray_wan_t2v_jobs_total", "queued")] >= 1
    assert values[("ray_wan_t2v_denoise_step_seconds_count", "")] >= CHEAP["sample_steps"]
    for phase in ("queue", "text_encode", "denoise", "decode", "write"):
        assert values[("ray_wan_t2v_generation_seconds_count", phase)] >= 1, phase
    assert values[("ray_wan_t2v_text_encode_seconds_count", "")] >= 1
    assert values[("ray_wan_t2v_prompt_cache_misses_total", "")] >= 1
    assert values[("ray_wan_t2v_prompt_cache_hits_total", "")] >= 1
    assert values[("ray_wan_t2v_pending_jobs", "")] == 0
    assert ("ray_wan_t2v_peak_gpu_memory_bytes", "") not in values  # the tiny app's generator runs on the CPU

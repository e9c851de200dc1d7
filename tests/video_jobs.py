"""Helpers the video jobs API tests share: cheap parameters, polling and reading the SSE stream."""

import json
import time
from collections.abc import Callable, Iterator

import httpx

# The cheapest video the demo model makes; decoding dominates its cost on a CPU (seconds per frame).
CHEAP = {"size": "624*624", "frame_num": 5, "sample_steps": 2}
# A job that keeps the generator busy until it is cancelled (each step is a full DiT forward pair).
LONG = {"size": "624*624", "frame_num": 5, "sample_steps": 100}


def submit(client: httpx.Client, prompt: str = "a red fox in snow", **params) -> dict:
    response = client.post("/v1/videos", json={"prompt": prompt, **CHEAP, **params})
    assert response.status_code == 202, response.text
    return response.json()


def poll(client: httpx.Client, video_id: str, until: Callable[[dict], bool], timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/videos/{video_id}").json()
        if until(job):
            return job
        assert time.monotonic() < deadline, f"gave up waiting; last state {job}"
        time.sleep(0.1)


def finished(job: dict) -> bool:
    return job["status"] in ("completed", "failed", "cancelled")


def events(client: httpx.Client, video_id: str) -> Iterator[tuple[str, dict, float]]:
    """(event name, job object, arrival time) from GET /v1/videos/{id}/events, until the stream ends."""
    with client.stream("GET", f"/v1/videos/{video_id}/events") as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        name, data = None, []
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data.append(line.removeprefix("data: "))
            elif not line and name:
                yield name, json.loads("\n".join(data)), time.monotonic()
                name, data = None, []

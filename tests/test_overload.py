"""A burst far past both admission limits: the job queue's (max_pending_jobs) and Ray Serve's own
(the gateway's max_ongoing_requests + max_queued_requests, made tiny here so the proxy's queue
overflows too). Every request gets 202 with a job or 429 with Retry-After, never a 5xx or a dropped
connection, and every accepted job completes."""

import asyncio
import time

import httpx
from ray import serve

from conftest import deploy, tiny_args
from video_jobs import CHEAP, poll

APP = "overload"
BURST = 120
MAX_PENDING = 4


async def burst(url: str) -> list[httpx.Response | Exception]:
    limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        posts = [client.post("/v1/videos", json={"prompt": f"burst {i}", **CHEAP}) for i in range(BURST)]
        return await asyncio.gather(*posts, return_exceptions=True)


def test_a_burst_gets_202_or_429_and_loses_no_job(serve_instance, tmp_path_factory):
    args = tiny_args(tmp_path_factory.mktemp(APP), max_pending_jobs=MAX_PENDING,
                     gateway={"max_ongoing_requests": 4, "max_queued_requests": 8})
    app = deploy(serve_instance, APP, args)
    try:
        started = time.monotonic()
        responses = asyncio.run(burst(app.url))
        dropped = [repr(response) for response in responses if isinstance(response, Exception)]
        assert not dropped, dropped
        codes = [response.status_code for response in responses]
        assert set(codes) <= {202, 429}, sorted(set(codes))
        rejected = [response for response in responses if response.status_code == 429]
        assert all(response.headers.get("retry-after") == "10" for response in rejected)
        # Both limits were hit: the gateway's full queue (our JSON error) and Serve's backpressure.
        by_gateway = [response for response in rejected if response.headers["content-type"] == "application/json"]
        assert by_gateway and all(response.json()["error"]["code"] == "queue_full" for response in by_gateway)
        assert len(by_gateway) < len(rejected), "Serve's own queue limit was never reached"

        accepted = [response.json() for response in responses if response.status_code == 202]
        assert MAX_PENDING <= len(accepted) < BURST
        with app.client() as client:
            for job in accepted:
                assert poll(client, job["id"], lambda job: job["status"] in ("completed", "failed"), timeout=180)["status"] == "completed"
            listed = client.get("/v1/videos", params={"limit": 100}).json()["data"]
        assert sorted(job["id"] for job in listed) == sorted(job["id"] for job in accepted)  # no job lost, none extra
        print(f"\nburst {BURST}: accepted {len(accepted)}, rejected 429 {len(rejected)} "
              f"({len(by_gateway)} by the job queue, {len(rejected) - len(by_gateway)} by Serve's backpressure), "
              f"completed {len(accepted)}, 5xx 0, dropped 0, wall {time.monotonic() - started:.1f}s")
    finally:
        serve.delete(APP)

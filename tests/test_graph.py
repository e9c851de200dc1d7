"""The Ray Serve graph end to end: placement, precedence, t5_cpu routing, cancellation, validation.

Real Ray (the session cluster declares one GPU resource; there is no CUDA, so GPU-placed replicas
fall back to the CPU device, with a warning), real HTTP, real MP4s. Each app is deployed once per
class and deleted at the end of it: the GPU resource can belong to one app at a time.
"""

import asyncio
import json
import time

import httpx
import pytest
from conftest import deploy, tiny_args
from ray import serve

from pipeline.params import MAX_PROMPT_CHARS
from pipeline.video import read_mp4

FAST = {"frame_num": 5, "sample_steps": 1, "size": "624*624", "seed": 11}


def deployment_details(app_name: str) -> dict:
    """Per deployment, what `serve status` reports (options, resources, status), from the controller.

    The session cluster runs without a dashboard, so `ray.util.state` has no API server to ask.
    """
    from ray.serve.context import _get_global_client

    return _get_global_client().get_serve_details()["applications"][app_name]["deployments"]


def gpus_by_deployment(app_name: str) -> dict[str, float]:
    return {
        name: details["deployment_config"]["ray_actor_options"].get("num_gpus", 0)
        for name, details in deployment_details(app_name).items()
    }


def stages(client: httpx.Client) -> dict:
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    return response.json()["stages"]


def sync_job(client: httpx.Client, body: dict) -> tuple[httpx.Response, dict]:
    response = client.post("/v1/videos/sync", json=body)
    assert response.status_code == 200, response.text
    return response, json.loads(response.headers["x-video-job"])


def wait_for(client: httpx.Client, path: str, done, timeout_s: float = 60.0) -> dict:
    """Poll a JSON endpoint until `done(body)`; returns the body."""
    deadline = time.monotonic() + timeout_s
    while True:
        body = client.get(path).json()
        if done(body):
            return body
        assert time.monotonic() < deadline, f"{path} never got there: {body}"
        time.sleep(0.2)


class TestGpuGeneratorWithPins:
    """One app: the generator asks for the GPU; the operator pins sample_shift and defaults sample_steps."""

    NAME = "graph"

    @pytest.fixture(scope="class")
    def app(self, serve_instance, tmp_path_factory):
        args = tiny_args(
            tmp_path_factory.mktemp("graph"),
            generator={"gpus_per_replica": 1},
            cpu_text_encoder={"torch_threads": 3},
            pins={"sample_shift": 5.0},
            defaults={"sample_steps": 3},
        )
        yield deploy(serve_instance, self.NAME, args)
        serve.delete(self.NAME)

    @pytest.fixture(scope="class")
    def client(self, app):
        with app.client() as client:
            yield client

    @pytest.fixture(scope="class")
    def pinned_sync(self, client):
        """One sync video asking for a pinned shift and the GPU encoder, leaving sample_steps to the operator."""
        body = {"prompt": "a lighthouse at dusk", "sample_shift": 9, "t5_cpu": False, "frame_num": 5, "size": "624*624", "seed": 3}
        return sync_job(client, body)

    def test_the_encoder_has_no_gpu_and_the_generator_has_one(self, client):
        report = stages(client)
        assert report["video_generator"]["ray_gpu_ids"]
        assert report["video_generator"]["device"] == "cpu"  # placed for CUDA, none here: the CPU, loudly
        encoder = report["text_encoder_cpu"]
        assert encoder["device"] == "cpu" and encoder["cuda_initialized"] is False
        assert encoder["torch_threads"] == 3  # the operator's thread count, not Ray's one-per-whole-CPU
        assert gpus_by_deployment(self.NAME) == {"TextEncoderCPU": 0, "VideoGenerator": 1, "Gateway": 0}
        details = deployment_details(self.NAME)
        assert details["VideoGenerator"]["required_resources"]["GPU"] == 1
        assert {name: item["status"] for name, item in details.items()} == dict.fromkeys(details, "HEALTHY")

    def test_a_pin_beats_the_request_and_reports_both_values(self, pinned_sync):
        _, job = pinned_sync
        assert job["parameters"]["sample_shift"] == 5.0
        assert job["overridden"] == [{"field": "sample_shift", "requested": 9, "effective": 5.0}]

    def test_an_operator_default_fills_a_silent_request_and_built_ins_the_rest(self, pinned_sync, tmp_path):
        response, job = pinned_sync
        assert job["parameters"]["sample_steps"] == 3
        assert job["parameters"]["sample_guide_scale"] == 6.0
        assert job["parameters"]["negative_prompt"] == ""  # the official one is applied at encode time
        assert job["timings"]["denoise"] > 0
        (tmp_path / "v.mp4").write_bytes(response.content)
        assert read_mp4(tmp_path / "v.mp4")[0].shape == (5, 624, 624, 3)

    def test_with_only_the_cpu_encoder_t5_cpu_false_is_served_on_the_cpu(self, pinned_sync):
        _, job = pinned_sync
        assert job["text_encoder"] == "cpu"
        assert job["parameters"]["t5_cpu"] is True

    def test_a_request_value_beats_an_operator_default(self, client):
        response = client.post("/v1/videos", json={"prompt": "a quick one", "sample_steps": 2, "frame_num": 5})
        assert response.status_code == 202, response.text
        job = response.json()
        client.delete(f"/v1/videos/{job['id']}")  # only its parameters matter here
        assert job["parameters"]["sample_steps"] == 2 and job["total_steps"] == 2
        assert job["parameters"]["sample_shift"] == 5.0 and job["overridden"] == []

    def test_a_pinned_field_still_rejects_an_out_of_range_request(self, client):
        response = client.post("/v1/videos", json={"prompt": "x", "sample_shift": -1})
        assert response.status_code == 422
        assert [item["field"] for item in response.json()["error"]["fields"]] == ["sample_shift"]

    def test_a_dropped_sync_request_frees_the_generator_within_a_step(self, app, client):
        prompt = "a slow pan over a glacier, to be abandoned"
        steps = 100  # the most a request may ask for: minutes of work, if nothing stopped it
        body = {"prompt": prompt, "sample_steps": steps, "frame_num": 9, "size": "832*480", "seed": 5}
        running = "/v1/videos?status=in_progress"

        def ours(listing: dict) -> dict:
            return next((job for job in listing["data"] if job["prompt"] == prompt), {"step": 0})

        async def drop_after_two_steps() -> tuple[str, float]:
            """Start the sync request; once two steps are seen, close its connection. Times one step."""
            async with httpx.AsyncClient(base_url=app.url, timeout=300) as requester:
                request = asyncio.ensure_future(requester.post("/v1/videos/sync", json=body))
                first = ours(await asyncio.to_thread(wait_for, client, running, lambda listing: ours(listing)["step"] >= 1))
                started = time.monotonic()
                await asyncio.to_thread(wait_for, client, running, lambda listing: ours(listing)["step"] > first["step"])
                request.cancel()  # httpx closes the connection of a request cancelled mid-response
                await asyncio.gather(request, return_exceptions=True)
                return first["id"], time.monotonic() - started

        job_id, step_seconds = asyncio.run(drop_after_two_steps())
        dropped = time.monotonic()
        job = wait_for(client, f"/v1/videos/{job_id}", lambda job: job["status"] != "in_progress", timeout_s=30)
        assert job["status"] == "cancelled"
        assert job["step"] < steps // 4, job
        wait_for(client, "/readyz", lambda ready: not ready["stages"]["video_generator"]["busy"], timeout_s=120)
        freed_after = time.monotonic() - dropped
        # The rest of the steps would take over 75 step times; a stopped generator is free within about one.
        assert freed_after < 25 * step_seconds + 5, (freed_after, step_seconds)

        started = time.monotonic()
        _, next_job = sync_job(client, {"prompt": "the next one", **FAST})
        assert next_job["parameters"]["sample_steps"] == 1
        assert time.monotonic() - started < 120

    def test_health_readiness_and_model_card(self, client):
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz").json()
        assert ready["ready"] is True and set(ready["stages"]) == {"text_encoder_cpu", "video_generator"}
        (card,) = client.get("/v1/models").json()["data"]
        assert card["id"] == "demo" and card["demo_model"] is True

    @pytest.mark.parametrize(
        ("body", "field"),
        [
            ({"prompt": "x", "size": "800*600"}, "size"),
            ({"prompt": "x", "frame_num": 80}, "frame_num"),
            ({"prompt": "x", "sample_steps": 0}, "sample_steps"),
            ({"prompt": "x", "sample_shift": -1}, "sample_shift"),
            ({"prompt": "   "}, "prompt"),
            ({"prompt": "x", "colour": "red"}, "colour"),
            ({"prompt": "x", "negative_prompt": "y" * (MAX_PROMPT_CHARS + 1)}, "negative_prompt"),
        ],
    )
    def test_an_invalid_parameter_is_a_422_naming_the_field(self, client, body, field):
        response = client.post("/v1/videos", json=body)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert [item["field"] for item in error["fields"]] == [field]
        assert error["message"].startswith(f"{field}: ")

    def test_a_prompt_over_its_limit_is_a_422_naming_the_limit(self, client):
        response = client.post("/v1/videos", json={"prompt": "x" * (MAX_PROMPT_CHARS + 1)})
        assert response.status_code == 422, response.text
        (item,) = response.json()["error"]["fields"]
        assert item["field"] == "prompt" and f"at most {MAX_PROMPT_CHARS} characters" in item["message"]

    @pytest.mark.parametrize(
        ("content", "code"),
        [(b'{"prompt": "a cat"', "invalid_json"), (b'{"prompt": "\xff\xfe"}', "invalid_body"),
         (b'{"prompt": "a cat \\ud800"}', "invalid_body"), (b'{"prompt": "x", "sample_guide_scale": NaN}', "invalid_json"),
         (b'{"prompt": "x", "seed": -Infinity}', "invalid_json")],
        ids=["malformed-json", "not-utf8", "lone-surrogate-escape", "nan", "infinity"],
    )
    def test_an_unreadable_body_is_a_400(self, client, content, code):
        response = client.post("/v1/videos", content=content, headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == code


def bound_gpus(app: serve.Application) -> dict[str, float]:
    """num_gpus per deployment of a built, undeployed app: the builder's placement decision.

    Deploying it would need the GPU resource another app of this module holds, and ~40 s.
    """
    deployment = app._bound_deployment
    found = {deployment.name: deployment.ray_actor_options.get("num_gpus", 0)}
    for bound in deployment.init_args:
        if isinstance(bound, serve.Application):
            found.update(bound_gpus(bound))
    return found


def test_by_default_the_generator_gets_a_gpu_where_the_cluster_has_one(serve_instance, tmp_path):
    """gpus_per_replica 'auto' (the default): one GPU per replica, since the session cluster declares one."""
    from deployments.app import build

    assert bound_gpus(build(tiny_args(tmp_path, generator={"gpus_per_replica": "auto"}))) == {
        "Gateway": 0, "TextEncoderCPU": 0, "VideoGenerator": 1
    }


def test_the_gpu_encoder_can_share_the_generators_gpu(serve_instance, tmp_path):
    """configs/fast_distilled.yaml's placement: umT5 and the generator on one GPU, a share each."""
    from deployments.app import build

    args = tiny_args(tmp_path, cpu_text_encoder=None, gpu_text_encoder={"num_cpus": 0.1, "num_gpus": 0.25},
                     generator={"gpus_per_replica": 0.75})
    assert bound_gpus(build(args)) == {"Gateway": 0, "TextEncoderGPU": 0.25, "VideoGenerator": 0.75}


class TestTwoEncoders:
    """Both encoders deployed: the GPU resource goes to the GPU encoder, the generator runs on the CPU."""

    NAME = "graph-routing"

    @pytest.fixture(scope="class")
    def client(self, serve_instance, tmp_path_factory):
        args = tiny_args(tmp_path_factory.mktemp("routing"), gpu_text_encoder={"num_cpus": 0.1})
        app = deploy(serve_instance, self.NAME, args)
        with app.client() as client:
            yield client
        serve.delete(self.NAME)

    def test_the_gpu_encoder_holds_the_gpu(self, client):
        assert gpus_by_deployment(self.NAME) == {"TextEncoderCPU": 0, "TextEncoderGPU": 1, "VideoGenerator": 0, "Gateway": 0}
        report = stages(client)
        assert report["text_encoder_gpu"]["placement"] == "gpu"
        assert report["text_encoder_cpu"]["cuda_initialized"] is False

    @pytest.mark.parametrize(("t5_cpu", "encoder"), [(True, "cpu"), (False, "gpu")])
    def test_t5_cpu_picks_the_encoder(self, client, t5_cpu, encoder):
        before = stages(client)[f"text_encoder_{encoder}"]["cache_misses"]
        _, job = sync_job(client, {"prompt": f"routed with t5_cpu={t5_cpu}", "t5_cpu": t5_cpu, **FAST})
        assert job["text_encoder"] == encoder
        assert job["parameters"]["t5_cpu"] is t5_cpu
        assert stages(client)[f"text_encoder_{encoder}"]["cache_misses"] > before  # that replica encoded it

"""The asynchronous video jobs API over real HTTP: submit, live progress, download, cancel, queue, list.

One app for the module; each test leaves the queue empty (it cancels what it does not finish).
"""

import io
import json

import pytest
from PIL import Image
from ray import serve

from conftest import deploy, tiny_args
from pipeline.video import read_mp4
from video_jobs import LONG, events, finished, poll, submit

MAX_PENDING = 3


@pytest.fixture(scope="module")
def jobs_app(serve_instance, tmp_path_factory):
    app = deploy(serve_instance, "jobs", tiny_args(tmp_path_factory.mktemp("jobs"), max_pending_jobs=MAX_PENDING))
    yield app
    serve.delete(app.name)


@pytest.fixture
def client(jobs_app):
    with jobs_app.client() as client:
        yield client


def test_a_job_streams_every_step_then_downloads(client, tmp_path):
    blocker = submit(client, **LONG)
    job = submit(client, frame_num=9, sample_steps=3)
    assert job["status"] == "queued" and job["queue_position"] == 1 and job["object"] == "video"

    stream = events(client, job["id"])
    name, state, _ = next(stream)
    assert (name, state["status"]) == ("state", "queued")  # the current state comes first
    client.delete(f"/v1/videos/{blocker['id']}")
    seen = list(stream)

    names = [name for name, _, _ in seen]
    updates = [update for _, update, _ in seen]
    assert names[-1] == "done" and updates[-1]["status"] == "completed"
    denoise_steps = [update["step"] for update in updates if update["phase"] == "denoise"]
    assert denoise_steps == [0, 1, 2, 3]  # one event per step
    phases = [update["phase"] for update in updates]
    assert list(dict.fromkeys(phases)) == ["starting", "text_encode", "denoise", "decode", "write", "completed"]
    progress = [update["progress"] for update in updates]
    assert progress == sorted(progress) and progress[-1] == 100

    done = client.get(f"/v1/videos/{job['id']}").json()
    assert done["status"] == "completed" and done["error"] is None and done["queue_position"] is None
    assert done["step"] == done["total_steps"] == 3 and done["attempts"] == 1
    assert all(isinstance(done[key], int) for key in ("created_at", "started_at", "completed_at", "progress"))
    assert done["created_at"] <= done["started_at"] <= done["completed_at"]
    assert set(done["timings"]) == {"queue", "text_encode", "negative_text_encode", "negative_prompt_wait", "prompt_wait", "denoise", "decode", "mp4_write"}
    assert (done["size"], done["seconds"], done["prompt"]) == ("624x624", "0.5", "a red fox in snow")
    assert done["parameters"]["frame_num"] == 9 and done["seed"] == done["parameters"]["seed"] >= 0

    # A cancel that arrives after the job completed (the race a look-then-DELETE lost): refused, video kept.
    late = client.post(f"/v1/videos/{job['id']}/cancel")
    assert late.status_code == 409, late.text
    error = late.json()["error"]
    assert error["code"] == "already_finished" and f"{job['id']} is already completed" in error["message"]
    assert [(item["field"], item["value"]) for item in error["fields"]] == [("video_id", job["id"])]
    assert client.get(f"/v1/videos/{job['id']}").json() == done

    video = client.get(f"/v1/videos/{job['id']}/content")
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    (tmp_path / "video.mp4").write_bytes(video.content)
    frames, _ = read_mp4(tmp_path / "video.mp4")
    assert frames.shape == (9, 624, 624, 3)
    assert client.get(f"/v1/videos/{job['id']}/content", params={"variant": "video"}).content == video.content

    part = client.get(f"/v1/videos/{job['id']}/content", headers={"Range": "bytes=100-299"})
    assert part.status_code == 206 and part.content == video.content[100:300]
    assert part.headers["content-range"] == f"bytes 100-299/{len(video.content)}"

    thumbnail = client.get(f"/v1/videos/{job['id']}/content", params={"variant": "thumbnail"})
    assert thumbnail.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumbnail.content)).size == (624, 624)

    again = list(events(client, job["id"]))  # a client reconnecting after the end
    assert [(name, update["status"]) for name, update, _ in again] == [("state", "completed"), ("done", "completed")]


def test_cancel_frees_the_generator_within_a_step(client):
    first = submit(client, **LONG)
    second = submit(client, sample_steps=3)
    arrivals = {}
    stream = events(client, first["id"])
    for _, update, arrived in stream:
        if update["phase"] == "denoise" and update["step"] >= 1:
            arrivals.setdefault(update["step"], arrived)
        if len(arrivals) == 6:
            break
    seconds_per_step = (max(arrivals.values()) - min(arrivals.values())) / 5
    cancelled_at_step = max(arrivals)
    cancelled = client.post(f"/v1/videos/{first['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    cancelled_time = arrivals[cancelled_at_step]

    rest = list(stream)
    assert rest[-1][0] == "done" and rest[-1][1]["status"] == "cancelled"
    assert max(update["step"] for _, update, _ in rest) <= cancelled_at_step + 1
    again = client.post(f"/v1/videos/{first['id']}/cancel")
    assert again.status_code == 409 and "is already cancelled" in again.json()["error"]["message"]

    for _, update, arrived in events(client, second["id"]):
        if update["phase"] == "denoise" and update["step"] >= 1:
            break
    # Had the first job kept the generator, the second would wait for its ~94 remaining steps.
    assert arrived - cancelled_time < 30 * seconds_per_step + 2.0, (arrived - cancelled_time, seconds_per_step)
    client.delete(f"/v1/videos/{second['id']}")
    assert poll(client, second["id"], finished)["status"] == "cancelled"


def test_queue_cap_positions_listing_and_unfinished_content(client):
    running = submit(client, **LONG)
    poll(client, running["id"], lambda job: job["status"] == "in_progress")
    queued = [submit(client, prompt=f"waiting {i}") for i in range(MAX_PENDING)]
    assert [job["queue_position"] for job in queued] == [1, 2, 3]

    refused = client.post("/v1/videos", json={"prompt": "one too many"})
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
    assert refused.json()["error"]["code"] == "queue_full"

    early = client.get(f"/v1/videos/{running['id']}/content")
    assert early.status_code == 409 and early.json()["error"]["fields"][0]["value"] == "in_progress"
    assert client.get("/v1/videos/video_000000000000000000000000").status_code == 404
    assert client.get("/v1/videos/not-an-id/content").status_code == 404
    missing = client.post("/v1/videos/video_000000000000000000000000/cancel")
    assert missing.status_code == 404 and missing.json()["error"]["fields"][0]["field"] == "video_id"

    page = client.get("/v1/videos", params={"limit": 2}).json()
    assert page["object"] == "list" and page["has_more"]
    assert [job["id"] for job in page["data"]] == [queued[2]["id"], queued[1]["id"]]  # newest first
    assert (page["first_id"], page["last_id"]) == (queued[2]["id"], queued[1]["id"])
    page = client.get("/v1/videos", params={"limit": 2, "after": page["last_id"]}).json()
    assert [job["id"] for job in page["data"]] == [queued[0]["id"], running["id"]]
    page = client.get("/v1/videos", params={"status": "queued", "order": "asc"}).json()
    assert [job["id"] for job in page["data"]] == [job["id"] for job in queued] and not page["has_more"]
    assert client.get("/v1/videos", params={"after": "video_000000000000000000000000"}).status_code == 422

    for job in [*queued, running]:
        assert client.delete(f"/v1/videos/{job['id']}").json()["status"] == "cancelled"
    assert client.get("/v1/videos", params={"status": "queued"}).json()["data"] == []
    deleted = client.delete(f"/v1/videos/{running['id']}").json()  # a finished job: gone for good
    assert deleted == {"id": running["id"], "object": "video.deleted", "deleted": True}
    assert client.get(f"/v1/videos/{running['id']}").status_code == 404


def test_openai_fields_set_size_and_frames(client):
    blocker = submit(client, **LONG)
    response = client.post("/v1/videos", json={"prompt": "p", "model": "wan2.1-t2v-1.3b", "size": "832x480", "seconds": "1"})
    job = response.json()
    assert response.status_code == 202 and job["status"] == "queued"
    assert job["parameters"]["frame_num"] == 17 and job["parameters"]["size"] == "832*480"
    assert (job["size"], job["seconds"]) == ("832x480", "1")
    both = client.post("/v1/videos", json={"prompt": "p", "seconds": "1", "frame_num": 9})
    assert both.status_code == 422
    too_long = client.post("/v1/videos", json={"prompt": "p", "seconds": "8"})
    assert too_long.status_code == 422 and too_long.json()["error"]["fields"][0]["field"] == "seconds"
    for queued in (job, blocker):
        client.delete(f"/v1/videos/{queued['id']}")


def test_a_sync_video_is_a_job_in_the_list(client):
    response = client.post("/v1/videos/sync", json={"prompt": "a sync fox", "size": "624*624", "frame_num": 5, "sample_steps": 2})
    assert response.status_code == 200, response.text
    video_id = json.loads(response.headers["x-video-job"])["id"]
    newest = client.get("/v1/videos", params={"limit": 1}).json()["data"][0]
    assert newest["id"] == video_id and newest["status"] == "completed" and newest["prompt"] == "a sync fox"
    assert client.get(f"/v1/videos/{video_id}/content").content == response.content


def test_the_service_stays_ready_while_the_generator_is_busy(client):
    """The generator takes one request at a time, so the readiness probe queues behind a video."""
    job = submit(client, **LONG)
    for _, update, _ in events(client, job["id"]):
        if update["phase"] == "denoise" and update["step"] >= 1:
            break
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["stages"]["video_generator"]["busy"] is True
    client.delete(f"/v1/videos/{job['id']}")
    assert poll(client, job["id"], finished)["status"] == "cancelled"


@pytest.mark.parametrize(("solver", "steps"), [("dmd", 3), ("euler", 4)])
def test_a_few_step_job_without_guidance_runs_its_sampler_end_to_end(client, solver, steps):
    job = submit(client, size="624*624", frame_num=5, sample_solver=solver, sample_steps=steps, sample_guide_scale=1)
    done = poll(client, job["id"], finished)
    assert done["status"] == "completed", done
    assert done["parameters"]["sample_solver"] == solver and done["total_steps"] == steps
    assert client.get(f"/v1/videos/{job['id']}/content").content[4:8] == b"ftyp"  # an MP4


def test_dmd_with_a_step_count_it_cannot_run_is_a_422_naming_sample_steps(client):
    response = client.post("/v1/videos", json={"prompt": "a fox", "sample_solver": "dmd"})
    assert response.status_code == 422, response.text
    assert [field["field"] for field in response.json()["error"]["fields"]] == ["sample_steps"]
    assert "dmd" in response.json()["error"]["message"]

"""A hard stop loses nothing: SIGKILL every replica mid-job, deploy again on the same output folder.

Finished videos still download, the interrupted job runs again at once (not after its lease, made
five minutes long here, since its owner is known dead) and completes, the queued one after it too,
and the list holds each job exactly once. The second deployment has two gateway replicas, which
race for every job: the leases let exactly one run each.
"""

import time
from pathlib import Path

from ray import serve

from conftest import deploy, kill_replicas, tiny_args
from video_jobs import poll, submit

APP = "durable"


def test_a_hard_stop_loses_no_job(serve_instance, tmp_path_factory):
    args = tiny_args(tmp_path_factory.mktemp(APP), lease_seconds=300)
    app = deploy(serve_instance, APP, args)
    with app.client() as client:
        done = submit(client, prompt="finished before the crash")
        poll(client, done["id"], lambda job: job["status"] == "completed")
        video = client.get(f"/v1/videos/{done['id']}/content").content
        interrupted = submit(client, prompt="running at the crash", sample_steps=30)
        waiting = submit(client, prompt="queued at the crash")
        poll(client, interrupted["id"], lambda job: job["phase"] == "denoise" and job["step"] >= 2)

    killed = time.time()
    assert kill_replicas(APP) == 3  # gateway, text encoder, generator
    serve.delete(APP)
    app = deploy(serve_instance, APP, tiny_args(args["output_dir"], lease_seconds=300, gateway={"num_replicas": 2}))
    try:
        with app.client() as client:
            again = poll(client, interrupted["id"], lambda job: job["attempts"] >= 2 and job["status"] != "queued", timeout=10)
            assert again["status"] in ("in_progress", "completed")
            for job in (interrupted, waiting):
                assert poll(client, job["id"], lambda job: job["status"] == "completed")["error"] is None
            assert client.get(f"/v1/videos/{done['id']}/content").content == video
            listed = client.get("/v1/videos", params={"order": "asc"}).json()["data"]
            assert [job["id"] for job in listed] == [done["id"], interrupted["id"], waiting["id"]]
            assert [job["attempts"] for job in listed][::2] == [1, 1]
            assert listed[1]["started_at"] >= int(killed)  # the rerun, not the killed attempt
    finally:
        serve.delete(APP)
    files = sorted(path.name for path in (Path(args["output_dir"]) / "videos").iterdir())  # no partial file
    assert files == sorted(f"{job['id']}{suffix}" for job in (done, interrupted, waiting) for suffix in (".jpg", ".json", ".mp4"))

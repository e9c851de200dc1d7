"""The `wan-t2v` client against the running tiny application: what a user types, what they get back.

`generate` and Ctrl-C run the installed console script in a subprocess (the real entry point, real
signals); the quick commands run `deployments.cli.main` in-process.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from deployments import cli
from deployments.client import VideosClient
from pipeline.video import read_mp4

WAN_T2V = shutil.which("wan-t2v", path=os.path.dirname(sys.executable)) or "wan-t2v"
PROMPT = "a red fox in snow"
SMALL = ["--size", "624*624", "--frame_num", "5", "--sample_steps", "3"]
LONG_JOB = {"prompt": "a long walk", "size": "624*624", "frame_num": 5, "sample_steps": 100}  # stopped long before it ends
LONG_FLAGS = [text for name, value in LONG_JOB.items() if name != "prompt" for text in (f"--{name}", str(value))]


def wan_t2v(app, *args: str, **popen) -> subprocess.Popen:
    """The installed CLI in a child process, with Ctrl-C's default meaning: a test run from a background
    shell job inherits SIGINT ignored, and Python then never raises KeyboardInterrupt."""
    return subprocess.Popen([WAN_T2V, "--url", app.url, *args], text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **popen)


def run_in_process(capsys, app, *args: str) -> tuple[int, str, str]:
    code = cli.main(["--url", app.url, *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def wait_for(condition, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"{what} not met after {timeout}s")


def job_status(app, job_id: str) -> str:
    with app.client() as client:
        return client.get(f"/v1/videos/{job_id}").json()["status"]


@pytest.fixture(scope="module")
def generated(tiny_app, tmp_path_factory):
    """One `wan-t2v generate` run, shared by the tests that need a finished job."""
    path = tmp_path_factory.mktemp("generate") / "fox.mp4"
    process = wan_t2v(tiny_app, "generate", PROMPT, *SMALL, "--seed", "7", "-o", str(path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return {"id": out.splitlines()[0], "out": out, "err": err, "path": path}


def test_generate_draws_progress_and_saves_a_playable_video(generated):
    assert re.fullmatch(r"video_[0-9a-f]{24}", generated["id"])
    assert "seed: 7" in generated["out"]
    assert f"saved: {generated['path']}" in generated["out"]
    assert "denoise" in generated["err"] and "3/3" in generated["err"]  # the bar: phase and step n/N
    assert "DEMO model" in generated["err"]
    frames, _ = read_mp4(generated["path"])
    assert frames.shape == (5, 624, 624, 3)


def test_status_prints_the_job_as_json(capsys, tiny_app, generated):
    code, out, _ = run_in_process(capsys, tiny_app, "status", generated["id"])
    job = json.loads(out)
    assert code == 0
    assert (job["id"], job["status"], job["seed"], job["parameters"]["frame_num"]) == (generated["id"], "completed", 7, 5)


def test_list_shows_jobs_newest_first(capsys, tiny_app, generated):
    code, out, _ = run_in_process(capsys, tiny_app, "list", "--status", "completed")
    header, *rows = out.splitlines()
    assert code == 0
    assert header.split() == ["ID", "STATUS", "PROGRESS", "CREATED", "PROMPT"]
    (row,) = [row for row in rows if row.startswith(generated["id"])]
    assert row.split()[1:3] == ["completed", "100%"] and row.endswith(PROMPT)


def test_download_saves_the_video_and_the_thumbnail(capsys, tiny_app, generated, tmp_path):
    code, out, _ = run_in_process(capsys, tiny_app, "download", generated["id"], "-o", str(tmp_path / "again.mp4"))
    assert code == 0 and "saved: " in out
    assert (tmp_path / "again.mp4").read_bytes() == generated["path"].read_bytes()
    code, _, _ = run_in_process(capsys, tiny_app, "download", generated["id"], "--thumbnail", "-o", str(tmp_path / "first.jpg"))
    assert code == 0 and (tmp_path / "first.jpg").read_bytes()[:2] == b"\xff\xd8"


@pytest.mark.parametrize(("flag", "value", "field"), [("--frame_num", "80", "frame_num"), ("--size", "800*600", "size")])
def test_bad_value_exits_2_with_the_servers_message(capsys, tiny_app, flag, value, field):
    code, out, err = run_in_process(capsys, tiny_app, "generate", PROMPT, flag, value)
    assert code == 2 and out == ""  # refused at submission: no job id
    assert f"wan-t2v: error: {field}: " in err and "allowed: " in err


def test_unknown_job_exits_2_with_the_servers_message(capsys, tiny_app):
    code, _, err = run_in_process(capsys, tiny_app, "status", "video_" + "0" * 24)
    assert code == 2 and "no video 'video_000000000000000000000000'" in err


def test_cancel_stops_a_running_job_and_never_touches_a_finished_one(capsys, monkeypatch, tiny_app, generated, tmp_path):
    with tiny_app.client() as client:
        job_id = client.post("/v1/videos", json=LONG_JOB).json()["id"]
    wait_for(lambda: job_status(tiny_app, job_id) == "in_progress", what=f"{job_id} in progress")
    code, out, _ = run_in_process(capsys, tiny_app, "cancel", job_id)
    assert (code, out) == (0, f"{job_id} cancelled\n")
    assert job_status(tiny_app, job_id) == "cancelled"
    code, _, err = run_in_process(capsys, tiny_app, "cancel", job_id)
    assert code == 1 and "already cancelled" in err

    # The race, made certain: any look the client takes still sees the job running, yet it has finished.
    monkeypatch.setattr(VideosClient, "retrieve", lambda _api, video_id: {"id": video_id, "status": "in_progress"})
    code, _, err = run_in_process(capsys, tiny_app, "cancel", generated["id"])
    assert code == 1 and f"{generated['id']} is already completed" in err
    assert job_status(tiny_app, generated["id"]) == "completed"
    code, _, _ = run_in_process(capsys, tiny_app, "download", generated["id"], "-o", str(tmp_path / "kept.mp4"))
    assert code == 0 and (tmp_path / "kept.mp4").read_bytes() == generated["path"].read_bytes()


@pytest.mark.parametrize(("answer", "after"), [("y\n", "cancelled"), ("\n", "in_progress")])
def test_ctrl_c_during_generate_asks_whether_to_cancel_the_job(tiny_app, tmp_path, answer, after):
    stderr_path = tmp_path / "stderr"
    with stderr_path.open("w") as stderr:
        process = wan_t2v(tiny_app, "generate", LONG_JOB["prompt"], *LONG_FLAGS, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                          cwd=tmp_path)  # where a job that was not stopped would save its video
    job_id = process.stdout.readline().strip()
    wait_for(lambda: "denoise" in stderr_path.read_text(), what="the progress bar in denoise")
    process.send_signal(signal.SIGINT)
    process.communicate(answer, timeout=60)
    assert process.returncode == cli.INTERRUPTED
    assert f"Cancel job {job_id} on the server? [y/N]" in stderr_path.read_text()
    assert job_status(tiny_app, job_id) == after
    with tiny_app.client() as client:
        client.delete(f"/v1/videos/{job_id}")  # free the generator for the next test


def test_server_and_key_come_from_the_environment_unless_given(monkeypatch):
    monkeypatch.setenv("WAN_T2V_URL", "http://gpu-box:8000/")
    monkeypatch.setenv("WAN_T2V_API_KEY", "secret")
    with cli.connect(cli.build_parser().parse_args(["list"])) as api:
        assert (api.url, api.http.headers["authorization"]) == ("http://gpu-box:8000", "Bearer secret")
    with cli.connect(cli.build_parser().parse_args(["--url", "http://a:1", "list", "--url", "http://b:2"])) as api:
        assert api.url == "http://b:2"


def test_a_pinned_parameter_is_reported_with_both_values(capsys):
    job = {"id": "video_" + "1" * 24, "seed": 42, "demo_model": False,
           "overridden": [{"field": "sample_shift", "requested": 4.0, "effective": 8.0}]}
    cli.announce(job)
    assert capsys.readouterr().out.splitlines() == [job["id"], "seed: 42", "sample_shift: 8.0 (pinned by the server; you asked for 4.0)"]

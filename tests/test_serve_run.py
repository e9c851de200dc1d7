"""`serve run <yaml>` as an operator types it, from the repo root, on a Ray cluster of its own.

Each YAML is copied with a free port and a temporary output_dir, everything else as shipped.
`--address local` makes `serve run` start a fresh local cluster: never the pytest session's, nor
one that another `ray start` on this machine left as the default. Everything it started is
stopped afterwards, by its process group (`ray stop` would also stop other people's clusters).
"""

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml
from conftest import free_port

from pipeline.video import read_mp4

ROOT = Path(__file__).resolve().parents[1]
DEMO_BANNER = "SERVING THE BUILT-IN DEMO MODEL"
STAGES = ("TextEncoderCPU", "VideoGenerator", "Gateway")


@dataclass
class ServeRun:
    process: subprocess.Popen
    url: str
    log: Path
    env: dict

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def dashboard(self) -> str:
        """The cluster's dashboard (what the serve CLI talks to), as `ray.init` printed it."""
        found = re.search(r"View the dashboard at \S*?(https?://[\w.]+:\d+)", self.output())
        assert found, "serve run printed no dashboard address"
        return found.group(1)

    def serve(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
        """A `serve` CLI command against this cluster (token auth: Ray 2.60 enables it by default)."""
        command = ["serve", *args, "--address", self.dashboard()]
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout_s, check=True)

    def deployment_statuses(self) -> dict[str, str]:
        (app,) = yaml.safe_load(self.serve("status").stdout)["applications"].values()
        return {name: deployment["status"] for name, deployment in app["deployments"].items()}


@contextmanager
def serve_run(config_path: Path, tmp_path: Path, ready_timeout_s: float = 240) -> Iterator[ServeRun]:
    """`serve run` a copy of `config_path` until /readyz is 200; always stops what it started."""
    config = yaml.safe_load(config_path.read_text())
    port = free_port()
    config["http_options"]["port"] = port
    for app in config["applications"]:
        app["args"]["output_dir"] = str(tmp_path / "outputs")
    copied = tmp_path / config_path.name
    copied.write_text(yaml.safe_dump(config, sort_keys=False))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WAN_T2V_CACHE": str(tmp_path / "cache"), "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "serve-run.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            ["serve", "run", str(copied), "--address", "local"],
            cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )
    running = ServeRun(process, f"http://127.0.0.1:{port}", log, env)
    try:
        wait_ready(running, ready_timeout_s)
        yield running
    finally:
        stop(running)


def wait_ready(running: ServeRun, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert running.process.poll() is None, f"serve run exited early:\n{running.output()[-3000:]}"
        stuck = re.search(r"Deployment '\w+' .* taken more than \d+s to be scheduled.*", running.output())
        if stuck:  # waiting longer will not help: the cluster lacks the resources the YAML asks for
            raise AssertionError(f"a replica cannot be placed: {stuck.group(0)}")
        try:
            if httpx.get(f"{running.url}/readyz", timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"not ready after {timeout_s}s:\n{running.output()[-3000:]}")


def stop(running: ServeRun) -> None:
    """Delete the apps, let `serve run` shut its cluster down (Ctrl-C), then end its process group."""
    try:
        running.serve("shutdown", "-y")
    except (AssertionError, subprocess.SubprocessError):
        pass  # the cluster may not have come up; the signals below still stop it
    running.process.send_signal(signal.SIGINT)
    try:
        running.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(running.process.pid, signal.SIGTERM)
        running.process.wait(timeout=30)
    try:
        os.killpg(running.process.pid, signal.SIGKILL)  # raylet, GCS, workers left behind, if any
    except ProcessLookupError:
        pass


def test_tiny_yaml_serves_a_playable_video(tmp_path):
    with serve_run(ROOT / "configs" / "tiny.yaml", tmp_path) as running:
        body = {"prompt": "a paper boat on a puddle", "frame_num": 9, "sample_steps": 3}
        response = httpx.post(f"{running.url}/v1/videos/sync", json=body, timeout=300)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "video/mp4"
        (tmp_path / "video.mp4").write_bytes(response.content)
        frames, meta = read_mp4(tmp_path / "video.mp4")
        assert frames.shape[0] == 9 and meta["codec"] == "h264"
        assert running.deployment_statuses() == dict.fromkeys(STAGES, "HEALTHY")


def test_the_default_serve_config_falls_back_to_the_demo_model_loudly(tmp_path):
    """No checkpoint here and no hub: serve_config.yaml (model auto, allow_demo) must still start, saying so."""
    with serve_run(ROOT / "serve_config.yaml", tmp_path) as running:
        (card,) = httpx.get(f"{running.url}/v1/models", timeout=30).json()["data"]
        assert card["demo_model"] is True and card["id"] == "demo"
        assert DEMO_BANNER in running.output()
        assert running.deployment_statuses() == dict.fromkeys(STAGES, "HEALTHY")

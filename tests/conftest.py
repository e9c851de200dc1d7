import os

# Tests never reach the Hugging Face hub; set before anything imports huggingface_hub.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

from pipeline.loading import resolve_model_source  # noqa: E402


def count_forward_calls(module):
    """Yield a list that gains one entry per forward pass of `module` (for use in fixtures)."""
    calls = []
    handle = module.register_forward_hook(lambda *_: calls.append(1))
    yield calls
    handle.remove()


@pytest.fixture(scope="session")
def demo_source(tmp_path_factory):
    """The built-in demo checkpoint, written once per test session into a temporary cache."""
    return resolve_model_source("demo", allow_demo=True, cache_dir=tmp_path_factory.mktemp("models"))


# -- Ray Serve: one cluster per test session ----------------------------------------------------

import socket  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import httpx  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def metrics_port() -> int:
    """Where Ray's metrics agent serves Prometheus text for the session's cluster (no dashboard needed)."""
    return free_port()


@pytest.fixture(scope="session")
def serve_instance(tmp_path_factory, metrics_port) -> Iterator[str]:
    """Real Ray with a GPU resource declared (so GPU placement is exercised) and Serve's HTTP proxy.

    Yields the proxy's base URL. Started once per session: a Ray start costs ~15 s on 2 cores.
    Metrics are reported every second (Ray's default is 10 s) so a test sees a job's metrics soon.
    """
    import ray
    from ray import serve

    os.environ.setdefault("WAN_T2V_CACHE", str(tmp_path_factory.mktemp("wan-cache")))
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="WARNING",
             _metrics_export_port=metrics_port, _system_config={"metrics_report_interval_ms": 1000},
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "WAN_T2V_CACHE": os.environ["WAN_T2V_CACHE"]}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def tiny_args(output_dir, **overrides) -> dict:
    """configs/tiny.yaml's args with a per-test output folder: demo model, fractional CPUs, no GPU use."""
    args = {
        "model": "demo",
        "allow_demo": True,
        "output_dir": str(output_dir),
        "cpu_text_encoder": {"num_cpus": 0.1},
        "generator": {"gpus_per_replica": 0, "num_cpus": 0.2},
        "gateway": {"num_cpus": 0.1},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(args.get(key), dict):
            args[key] = {**args[key], **value}
        else:
            args[key] = value
    return args


@dataclass
class RunningApp:
    name: str
    url: str  # base URL including the route prefix, no trailing slash
    output_dir: str

    def client(self, timeout: float = 120.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)


def deploy(serve_url: str, name: str, args: dict, timeout_s: float = 180.0) -> RunningApp:
    """Build the app through the real builder and wait until /readyz says every stage is loaded."""
    from ray import serve

    from deployments.app import build

    serve.run(build(args), name=name, route_prefix=f"/{name}", blocking=False)
    app = RunningApp(name=name, url=f"{serve_url}/{name}", output_dir=args["output_dir"])
    deadline = time.monotonic() + timeout_s
    with app.client(timeout=10) as client:
        while time.monotonic() < deadline:
            try:
                if client.get("/readyz").status_code == 200:
                    return app
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
    raise TimeoutError(f"app {name} not ready after {timeout_s}s")


def kill_replicas(app: str, deployment: str = "") -> int:
    """SIGKILL the processes of every replica of `app` (of one deployment, if named): no shutdown
    hooks run, as in a crash. Returns how many."""
    import signal

    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}"
    names = [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True) if actor["name"].startswith(prefix)]
    pids = [ray.get(ray.get_actor(name, namespace="serve").__ray_call__.remote(lambda replica: os.getpid())) for name in names]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return len(pids)


@pytest.fixture(scope="module")
def tiny_app(serve_instance, tmp_path_factory) -> Iterator[RunningApp]:
    """The tiny application (demo model, CPU only), one per test module, deleted afterwards."""
    from ray import serve

    name = "tiny"
    app = deploy(serve_instance, name, tiny_args(tmp_path_factory.mktemp("outputs")))
    yield app
    serve.delete(name)

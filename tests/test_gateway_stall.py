"""The gateway stays responsive through long jobs run back to back (the 2026-12-02 stall on an H200).

Root cause (bench/results/gateway-stall-h200-2026-12-02/): after each video the gateway awaited the
prompt's encode, an ObjectRef holding a torch tensor, only to read the encode's seconds. Ray runs the
unpickling of an awaited object on its core-worker I/O thread; there torch 2.11's storage unpickling
(`THPStorage_setFromFile` -> `StorageImpl::incref_pyobject` -> pybind11 `gil_scoped_acquire`) waited
for the GIL that its own thread held. Every thread of the gateway froze, Serve's health checks with
them, and the replica was killed under the client's request.

The deadlock needs that torch build, but its cause is visible on any: the gateway must never
unpickle a tensor. A Python audit hook in the gateway's process records every class it unpickles.
"""

import os
import sys
import threading
import time
import types

import httpx
import pytest
import ray
from ray import serve

from conftest import deploy, tiny_args
from video_jobs import events, submit

JOB = {"size": "624*624", "frame_num": 5, "sample_steps": 8}


def gateway_actor(app: str):
    (name,) = [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
               if actor["name"].startswith(f"SERVE_REPLICA::{app}#Gateway")]
    return ray.get_actor(name, namespace="serve")


@pytest.fixture(scope="module")
def stall_app(serve_instance, tmp_path_factory):
    # A short lease and recovery check: the runner renews and the recovery loop looks up owners all the time.
    app = deploy(serve_instance, "stall", tiny_args(tmp_path_factory.mktemp("stall"), lease_seconds=2.0))
    yield app
    serve.delete(app.name)


def test_back_to_back_jobs_never_block_the_gateway(stall_app):
    # Defined here, not at module level, so that Ray ships them by value into the gateway's process.
    def record_unpickled_classes(_replica) -> int:
        """In the gateway's process: from now on, note (thread, module, name) of every unpickled global."""
        audit = types.ModuleType("wan_t2v_unpickle_audit")
        audit.seen = []

        def hook(event, args):
            if event == "pickle.find_class":
                audit.seen.append((threading.current_thread().name, str(args[0]), str(args[1])))

        sys.modules[audit.__name__] = audit
        sys.addaudithook(hook)
        return os.getpid()

    def unpickled_classes(_replica) -> list[tuple[str, str, str]]:
        return list(sys.modules["wan_t2v_unpickle_audit"].seen)

    gateway = gateway_actor(stall_app.name)
    pid = ray.get(gateway.__ray_call__.remote(record_unpickled_classes))

    slowest = [0.0]
    stop = threading.Event()

    def probe_health() -> None:
        with httpx.Client(base_url=stall_app.url, timeout=30) as client:
            while not stop.is_set():
                started = time.monotonic()
                assert client.get("/healthz").status_code == 200
                slowest[0] = max(slowest[0], time.monotonic() - started)
                time.sleep(0.2)

    followed: list[str] = []

    def follow(video_id: str) -> None:
        with httpx.Client(base_url=stall_app.url, timeout=120) as client:
            followed.extend(name for name, _, _ in events(client, video_id))

    prober = threading.Thread(target=probe_health, daemon=True)
    prober.start()
    with stall_app.client(timeout=180) as client:
        for round_ in range(3):
            queued = submit(client, prompt=f"a red fox in snow, take {round_}", **JOB)
            followers = [threading.Thread(target=follow, args=(queued["id"],)) for _ in range(2)]
            for follower in followers:
                follower.start()
            response = client.post("/v1/videos/sync", json={"prompt": f"a grey wolf at dusk, take {round_}", **JOB})
            assert response.status_code == 200, response.text
            for follower in followers:
                follower.join(timeout=180)
    stop.set()
    prober.join(timeout=30)

    assert followed.count("done") == 6
    torch_classes = [entry for entry in ray.get(gateway.__ray_call__.remote(unpickled_classes)) if entry[1].startswith("torch")]
    assert torch_classes == [], f"the gateway unpickled tensors (the stall's cause): {torch_classes[:5]}"
    assert ray.get(gateway.__ray_call__.remote(lambda _: os.getpid())) == pid  # the same replica throughout
    # Every probe answered at once: nothing in the gateway holds its event loop (or its GIL) for long.
    assert slowest[0] < 2.0, f"a health probe took {slowest[0]:.1f} s"
    print(f"slowest /healthz {slowest[0] * 1000:.0f} ms", file=sys.stderr)

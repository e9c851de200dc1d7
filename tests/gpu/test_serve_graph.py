"""The served graph on real weights: Ray with the real GPU, Serve, one short video over HTTP.

Runs where WAN_CKPT_DIR points at a Wan2.1-T2V-1.3B folder (release or diffusers layout). The app is
configs/single_gpu.yaml's (model auto, one GPU per generator, compile, bf16 VAE, attention auto,
warmed at its default 832*480 x 81 frames) with CPU shares that fit a 16-core machine; the video is
short in steps, not in shape, so the request compiles nothing. $WAN_T2V_COMPILE_CACHE, where set,
is the generator's compile_cache_dir: pointed at the service's, the test starts as a second start does.
"""

import json
import os

import pytest
from conftest import deploy, free_port  # tests/conftest.py

from pipeline.video import read_mp4

from .helpers import FLASH3_MISSING

pytestmark = pytest.mark.skipif(not os.environ.get("WAN_CKPT_DIR"),
                                reason="needs WAN_CKPT_DIR: a Wan2.1-T2V-1.3B folder (release or diffusers layout)")

REQUEST = {"prompt": "a red fox trots through fresh snow at dawn", "size": "832*480", "frame_num": 81, "sample_steps": 2, "seed": 7}


def app_args(output_dir) -> dict:
    return {
        "model": "auto",  # $WAN_CKPT_DIR comes first
        "output_dir": str(output_dir),
        "cpu_text_encoder": {"num_cpus": 8},  # umT5-XXL on 8 threads
        "generator": {"gpus_per_replica": 1, "num_cpus": 1, "memory_policy": "resident", "compile": True,
                      "vae_dtype": "bfloat16", "attention": "auto", "compile_cache_dir": os.environ.get("WAN_T2V_COMPILE_CACHE")},
        "gateway": {"num_cpus": 0.5},
    }


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """A Ray cluster of its own with the machine's GPU (not the CPU tests' session cluster, whose GPU is
    only declared), Serve on a free port, and the app; all shut down afterwards."""
    import ray
    from ray import serve

    if ray.is_initialized():
        pytest.skip("a Ray cluster already runs in this process: run tests/gpu on its own")
    # 16 logical CPUs, as on the GPU machine: the replicas' shares (8 + 1 + 0.5) fit whatever Ray detects.
    ray.init(num_cpus=16, num_gpus=1, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # Loading umT5-XXL and the DiT, then compiling and warming the DiT blocks and VAE norms: minutes.
        yield deploy(f"http://127.0.0.1:{port}", "wan", app_args(tmp_path_factory.mktemp("outputs")), timeout_s=480)
    finally:
        serve.shutdown()
        ray.shutdown()


def test_the_generator_runs_on_the_gpu_with_the_expected_kernel(app):
    with app.client() as client:
        response = client.get("/readyz")
    assert response.status_code == 200, response.text
    generator = response.json()["stages"]["video_generator"]
    assert generator["device"].startswith("cuda") and generator["ray_gpu_ids"], generator
    assert generator["attention"] == ("sdpa" if FLASH3_MISSING else "flash3"), generator
    # Each replica reports its start-up phases; the encoder was warmed before it said ready.
    assert {"load_dit", "load_vae", "place", "compile_warmup"} <= set(generator["startup"]["phases"]), generator["startup"]
    encoder = response.json()["stages"]["text_encoder_cpu"]
    assert {"load", "touch_weights", "encode_warm_texts", "probe_40_tokens"} <= set(encoder["startup"]["phases"]), encoder["startup"]
    assert encoder["cache_misses"] >= 1  # the default negative prompt, encoded at start


def test_a_short_sync_video_is_a_real_mp4(app, tmp_path):
    with app.client(timeout=300) as client:
        response = client.post("/v1/videos/sync", json=REQUEST)
    assert response.status_code == 200, response.text[:2000]
    assert response.headers["content-type"] == "video/mp4"
    assert response.content[4:8] == b"ftyp"  # an ISO media file's first box
    job = json.loads(response.headers["x-video-job"])
    assert job["demo_model"] is False and job["memory_policy"] == "resident"
    shown = job["parameters"]
    assert (shown["size"], shown["frame_num"], shown["sample_steps"]) == (REQUEST["size"], REQUEST["frame_num"], REQUEST["sample_steps"])
    assert job["timings"]["denoise"] > 0 and job["timings"]["decode"] > 0, job["timings"]
    path = tmp_path / "video.mp4"
    path.write_bytes(response.content)
    frames, meta = read_mp4(path)  # decoded by imageio-ffmpeg
    assert frames.shape == (81, 480, 832, 3)
    assert meta["size"] == (832, 480)

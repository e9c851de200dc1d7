"""LoRA adapters through the Serve graph: the YAML's `loras:` registry, `lora`/`lora_scale` per job,
/v1/models and /v1/config listing them, and bad names answered 4xx by field."""

import json

import numpy as np
import pytest
from pydantic import ValidationError

from conftest import deploy, tiny_args
from deployments.app import AppArgs
from pipeline.demo import build_transformer
from pipeline.video import read_mp4
from test_lora import random_adapter, saved
from video_jobs import CHEAP

PROMPT = {"prompt": "a paper boat on a pond", "seed": 7, **CHEAP}


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    model = build_transformer()
    return {"style": str(saved(random_adapter(model, 21), folder / "style.safetensors")),
            "motion": str(saved(random_adapter(model, 22), folder / "motion.safetensors"))}


@pytest.fixture(scope="module")
def lora_app(serve_instance, tmp_path_factory, adapter_files):
    from ray import serve

    app = deploy(serve_instance, "loras", tiny_args(tmp_path_factory.mktemp("outputs"), loras=adapter_files))
    yield app
    serve.delete("loras")


def frames_of(client, tmp_path, **params):
    response = client.post("/v1/videos/sync", json={**PROMPT, **params})
    assert response.status_code == 200, response.text
    path = tmp_path / f"{len(list(tmp_path.iterdir()))}.mp4"
    path.write_bytes(response.content)
    return read_mp4(path)[0].astype(np.int16), json.loads(response.headers["x-video-job"])


def test_models_and_config_list_the_served_adapters(lora_app):
    with lora_app.client() as client:
        models = client.get("/v1/models").json()["data"]
        config = client.get("/v1/config").json()
    base, *adapters = models
    assert base.get("kind") is None and [(a["id"], a["kind"], a["parent"]) for a in adapters] == [
        ("style", "lora", base["id"]), ("motion", "lora", base["id"])]
    assert config["loras"] == ["style", "motion"]
    row = next(row for row in config["parameters"] if row["name"] == "lora")
    assert row["choices"] == ["", "style", "motion"] and row["default"] == ""


def test_an_adapter_changes_the_video_and_scale_zero_gives_the_base_video(lora_app, tmp_path):
    with lora_app.client() as client:
        base, base_job = frames_of(client, tmp_path)
        styled, styled_job = frames_of(client, tmp_path, lora="style")
        unscaled, _ = frames_of(client, tmp_path, lora="style", lora_scale=0)
        other, _ = frames_of(client, tmp_path, lora="motion", lora_scale=0.5)
        styled_again, _ = frames_of(client, tmp_path, lora="style")
    assert styled_job["parameters"]["lora"] == "style" and styled_job["parameters"]["lora_scale"] == 1.0
    assert base_job["parameters"]["lora"] == ""
    assert np.abs(styled - base).mean() > 2  # the adapter moved the pixels
    assert np.array_equal(unscaled, base)  # scale 0 adds exact zeros: the base video
    assert np.abs(other - styled).mean() > 2
    assert np.array_equal(styled_again, styled)  # switching back reloads nothing and changes nothing
    assert "lora_switch" in styled_job["timings"]


@pytest.mark.parametrize(("fields", "field", "message"), [
    ({"lora": "watercolor"}, "lora", "no adapter named 'watercolor'; allowed: empty for none, or one of the served adapters (style, motion"),
    ({"lora": "../style.safetensors"}, "lora", "not an adapter name"),
    ({"lora": "style", "lora_scale": 2.5}, "lora_scale", "allowed: a number from 0 to 2"),
])
def test_an_unknown_or_bad_adapter_is_a_422_naming_the_field(lora_app, fields, field, message):
    with lora_app.client() as client:
        response = client.post("/v1/videos", json={**PROMPT, **fields})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["message"].startswith(f"{field}: ") and message in error["message"], error


def test_the_registry_is_checked_before_any_replica_starts(adapter_files, tmp_path):
    with pytest.raises(ValidationError, match=r"loras\.ghost: LoRA adapter .*missing\.safetensors: no such file"):
        AppArgs(loras={"ghost": str(tmp_path / "missing.safetensors")})
    with pytest.raises(ValidationError, match="is not an adapter name"):
        AppArgs(loras={"my style": adapter_files["style"]})
    with pytest.raises(ValidationError, match=r"pins\.lora: 'motion' is not in loras \(served: style\)"):
        AppArgs(loras={"style": adapter_files["style"]}, pins={"lora": "motion"})
    assert AppArgs(loras={"style": adapter_files["style"]}, pins={"lora": "style", "lora_scale": 0.8}).pins.lora == "style"

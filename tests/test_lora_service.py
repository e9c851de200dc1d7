"""LoRA adapters through the Serve graph: the YAML's `loras:` registry, `lora`/`lora_scale` per job,
/v1/models and /v1/config listing them, and bad names answered 4xx by field."""

import json
import re
import subprocess

import numpy as np
import pytest
from playwright.sync_api import expect
from pydantic import ValidationError

from conftest import deploy, tiny_args
from deployments.app import AppArgs
from pipeline.demo import build_transformer
from pipeline.video import read_mp4
from test_cli_client import wan_t2v
from test_lora import random_adapter, saved
from test_web import CHROMIUM, browser, generate, watched_page  # noqa: F401 (browser: the module-scoped fixture, one per module)
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


# -- the page and the `wan-t2v` client against the same app (no second deployment) --------------

needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's Chromium at /usr/bin/chromium (apt-get install chromium)"
)
CLI_CHEAP = [text for name, value in CHEAP.items() for text in (f"--{name}", str(value))]


@pytest.fixture
def lora_page(browser, lora_app):  # noqa: F811
    """test_web's `page`, on the app that serves adapters."""
    with watched_page(browser, lora_app.url) as page:
        yield page


@needs_chromium
def test_the_page_offers_the_served_adapters_and_a_job_runs_with_the_chosen_one(lora_page, lora_app):
    page = lora_page
    expect(page.locator("#lora-fields")).to_be_visible()
    options = page.locator("#lora option").evaluate_all("options => options.map(o => [o.value, o.textContent])")
    assert options == [["", "无（基础模型）"], ["style", "style"], ["motion", "motion"]]
    expect(page.locator("#lora")).to_have_value("")  # the base model unless one is chosen
    expect(page.locator("#lora_scale")).to_have_value("1")

    page.select_option("#lora", "style")
    page.fill("#lora_scale", "0.5")
    generate(page, "a paper boat on a pond", CHEAP["sample_steps"])
    job_id = re.fullmatch(r"v1/videos/(video_[0-9a-f]{24})/content", page.locator("#download").get_attribute("href")).group(1)
    with lora_app.client() as client:
        job = client.get(f"/v1/videos/{job_id}").json()
    assert (job["status"], job["parameters"]["lora"], job["parameters"]["lora_scale"]) == ("completed", "style", 0.5), job
    expect(page.locator("#job-summary")).to_contain_text("LoRA style（强度 0.5）")
    item = page.locator(f'#history [data-job-id="{job_id}"]')
    expect(item.locator(".summary")).to_contain_text("LoRA style（强度 0.5）")

    page.select_option("#lora", "")
    item.get_by_role("button", name="用这些设置再次生成").click()
    expect(page.locator("#lora")).to_have_value("style")  # the job's adapter comes back with its settings

    page.click("#lang-toggle")
    expect(page.locator('#lora option[value=""]')).to_have_text("None (base model)")
    expect(page.locator("label[for=lora]")).to_have_text("LoRA adapter")
    expect(page.locator("#job-summary")).to_contain_text("LoRA style (strength 0.5)")


def test_wan_t2v_generate_uses_the_named_adapter(lora_app, tmp_path):
    path = tmp_path / "boat.mp4"
    process = wan_t2v(lora_app, "generate", PROMPT["prompt"], "--lora", "style", "--lora_scale", "0.5", *CLI_CHEAP,
                      "-o", str(path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert f"saved: {path}" in out
    frames, _ = read_mp4(path)
    assert frames.shape == (CHEAP["frame_num"], 624, 624, 3)
    with lora_app.client() as client:
        job = client.get(f"/v1/videos/{out.splitlines()[0]}").json()
    assert (job["status"], job["parameters"]["lora"], job["parameters"]["lora_scale"]) == ("completed", "style", 0.5), job


def test_wan_t2v_generate_with_an_unknown_adapter_exits_2_with_the_servers_message(lora_app):
    process = wan_t2v(lora_app, "generate", PROMPT["prompt"], "--lora", "watercolor", *CLI_CHEAP,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = process.communicate(timeout=60)
    assert (process.returncode, out) == (2, "")  # refused at submission: no job id
    assert "wan-t2v: error: lora: no adapter named 'watercolor'; allowed: " in err and "style, motion" in err, err
    assert "Traceback" not in err

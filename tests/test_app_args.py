"""The app's YAML `args`, checked without Ray: a typo fails by name instead of being dropped.

Ray Serve hands `args` to the builder as given and ignores unknown keys in most of its own schemas,
so this is the only place a misspelt preset is caught before an operator's deploy goes wrong.
"""

import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

from deployments.app import AppArgs, build
from pipeline.loading import ModelNotFound

ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIGS = sorted((ROOT / "configs").glob("*.yaml")) + [ROOT / "serve_config.yaml"]
# The quick-start configs may fall back to the demo model; every other preset is for real weights.
DEMO_CONFIGS = ("tiny.yaml", "serve_config.yaml")


def error_locations(error: ValidationError) -> list[str]:
    return [".".join(str(part) for part in item["loc"]) for item in error.errors()]


@pytest.mark.parametrize(
    ("args", "named"),
    [
        ({"genrator": {}}, "genrator"),
        ({"generator": {"num_replica": 2}}, "generator.num_replica"),
        ({"cpu_text_encoder": {"num_cpu": 1}}, "cpu_text_encoder.num_cpu"),
        ({"pins": {"sample_shift": -1}}, "pins.sample_shift"),
        ({"defaults": {"frame_num": 80}}, "defaults.frame_num"),
        ({"pins": {"sample_shfit": 5}}, "pins.sample_shfit"),
        ({"generator": {"gpus_per_replica": -1}}, "generator.gpus_per_replica"),  # Ray would say "num_gpus"
        ({"generator": {"attention": "flash2"}}, "generator.attention"),
    ],
)
def test_a_bad_key_or_value_is_rejected_by_name(args, named):
    with pytest.raises(ValidationError) as raised:
        AppArgs(**args)
    assert any(place.startswith(named) for place in error_locations(raised.value))
    assert named in str(raised.value)


def test_an_autoscaling_typo_is_rejected_by_name():
    """Ray's AutoscalingConfig ignores unknown keys: `target_ongoing_request` would silently become 2."""
    scaling = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_request": 1}
    with pytest.raises(ValidationError) as raised:
        AppArgs(generator={"autoscaling_config": scaling})
    assert any(place.startswith("generator.autoscaling_config") for place in error_locations(raised.value))
    assert "target_ongoing_request" in str(raised.value)


def test_a_step_cache_with_compiled_blocks_is_rejected_before_any_replica_starts():
    with pytest.raises(ValidationError, match="step cache and compiled DiT blocks do not combine"):
        AppArgs(generator={"compile": True, "step_cache": {"kind": "taylorseer"}})


def test_no_text_encoder_at_all_is_rejected():
    with pytest.raises(ValidationError, match="at least one of cpu_text_encoder and gpu_text_encoder"):
        AppArgs(cpu_text_encoder=None)


def test_a_gpu_share_on_the_cpu_encoder_is_rejected_naming_it():
    with pytest.raises(ValidationError, match="cpu_text_encoder.num_gpus: the CPU encoder reserves no GPU"):
        AppArgs(cpu_text_encoder={"num_gpus": 0.5})
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        AppArgs(gpu_text_encoder={"num_gpus": 2})


def test_pins_and_defaults_are_normalised_like_requests():
    args = AppArgs(pins={"size": "832x480"}, defaults={"sample_steps": 3})
    assert args.pins.given() == {"size": "832*480"}
    assert args.defaults.given() == {"sample_steps": 3}


def check_serve_config(config: dict, name: str) -> list[AppArgs]:
    """What `serve run` and the builder would reject, plus the keys both would silently drop."""
    assert set(config) <= set(ServeDeploySchema.model_fields), f"{name}: unknown top-level key"
    ServeDeploySchema.model_validate(config)
    checked = []
    for app in config["applications"]:
        assert set(app) <= set(ServeApplicationSchema.model_fields), f"{name}: unknown key in {app['name']}"
        assert app["import_path"] == "deployments.app:build"
        args = AppArgs(**app["args"])
        # Open to the network only behind API keys: otherwise anyone could list every prompt and delete videos.
        assert config.get("http_options", {}).get("host") in ("127.0.0.1", "localhost") or args.auth, f"{name}: listens beyond this machine with no API keys"
        scaling = args.generator.autoscaling_config
        if scaling:
            assert set(scaling) <= set(AutoscalingConfig.model_fields), f"{name}: unknown autoscaling key"
            AutoscalingConfig(**scaling)
        checked.append(args)
    return checked


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda path: path.name)
def test_every_shipped_serve_config_is_valid(path):
    check_serve_config(yaml.safe_load(path.read_text()), path.name)


def test_the_commented_autoscaling_example_is_valid_once_uncommented():
    """multi_gpu.yaml documents autoscaling in comments; an operator who uncomments it must get a working config."""
    text = (ROOT / "configs" / "multi_gpu.yaml").read_text()
    uncommented = re.sub(r"^(\s*)# (autoscaling_config:|  \w+:)", r"\1\2", text, flags=re.MULTILINE)
    (args,) = check_serve_config(yaml.safe_load(uncommented), "multi_gpu.yaml, uncommented")
    assert args.generator.autoscaling_config["max_replicas"] == args.generator.num_replicas


@pytest.mark.parametrize("path", [path for path in SERVE_CONFIGS if path.name not in DEMO_CONFIGS], ids=lambda path: path.name)
def test_a_production_preset_without_weights_fails_the_build_instead_of_serving_the_demo(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./Wan2.1-T2V-1.3B here; tests run with HF_HUB_OFFLINE (conftest)
    monkeypatch.delenv("WAN_CKPT_DIR", raising=False)
    (app,) = yaml.safe_load(path.read_text())["applications"]
    model = app["args"].get("model", "auto")
    expected = "no Wan2.1-T2V-1.3B checkpoint found.*allow_demo is off" if model == "auto" else f"{re.escape(model)}: not in the Hugging Face cache"
    with pytest.raises(ModelNotFound, match=expected):
        build(app["args"])

import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pipeline.__main__ import CLI_ADAPTER, build_parser, default_save_file, params_from_args
from pipeline.demo import build_transformer
from pipeline.params import GenerationParams, describe_errors
from pipeline.video import read_mp4
from test_lora import random_adapter, saved

PROMPT = "a red fox in snow"


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    """The CLI's environment: its own demo cache and an empty, offline Hugging Face cache."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["HF_HOME"] = str(tmp_path_factory.mktemp("hf-home"))
    env["WAN_T2V_CACHE"] = str(tmp_path_factory.mktemp("cli-cache"))
    for name in ("WAN_CKPT_DIR", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        env.pop(name, None)
    return env


def run_cli(env, cwd, *args):
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def run_demo(env, cwd, *args):
    done = run_cli(env, cwd, "--model", "demo", "--prompt", PROMPT, *args)
    assert done.returncode == 0, done.stderr
    return done


def test_readme_command_writes_the_video(cli_env, tmp_path):
    readme_args = "--size 832*480 --frame_num 17 --sample_steps 4 --base_seed 7 --save_file fox.mp4".split()
    done = run_demo(cli_env, tmp_path, *readme_args)
    frames, meta = read_mp4(tmp_path / "fox.mp4")
    assert frames.shape == (17, 480, 832, 3)
    assert meta["size"] == (832, 480)
    assert "seed: 7" in done.stdout
    assert "DEMO MODEL" in done.stderr
    assert (Path(cli_env["WAN_T2V_CACHE"]) / "demo-v1" / "model_index.json").is_file()


def test_same_seed_same_video_other_seed_other_video(cli_env, tmp_path):
    small = ["--frame_num", "5", "--sample_steps", "2"]
    run_demo(cli_env, tmp_path, *small, "--base_seed", "7", "--save_file", "a.mp4")
    run_demo(cli_env, tmp_path, *small, "--base_seed", "7", "--save_file", "b.mp4")
    run_demo(cli_env, tmp_path, *small, "--base_seed", "8")  # no --save_file: the default name, in the cwd
    (default_named,) = tmp_path.glob("t2v-1.3B_832x480_a_red_fox_in_snow_*.mp4")
    first, again, other = (read_mp4(path)[0] for path in (tmp_path / "a.mp4", tmp_path / "b.mp4", default_named))
    assert first.shape == (5, 480, 832, 3)
    np.testing.assert_array_equal(again, first)
    assert not np.array_equal(other, first)


@pytest.mark.parametrize(
    ("flag", "value", "field"),
    [
        ("--size", "800*600", "size"),
        ("--frame_num", "80", "frame_num"),
        ("--sample_steps", "0", "sample_steps"),
        ("--sample_shift", "-1", "sample_shift"),
        ("--prompt", "  ", "prompt"),
        ("--t5_cpu", "maybe", "t5_cpu"),
    ],
)
def test_invalid_value_exits_naming_the_field(cli_env, tmp_path, flag, value, field):
    done = run_cli(cli_env, tmp_path, "--model", "demo", "--prompt", PROMPT, flag, value)
    assert done.returncode == 2
    assert f"error: {field}: " in done.stderr
    assert "allowed: " in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_auto_never_falls_back_to_the_demo(cli_env, tmp_path):
    done = run_cli(cli_env, tmp_path, "--prompt", PROMPT, "--frame_num", "5", "--sample_steps", "2")
    assert done.returncode == 1
    assert "no Wan2.1-T2V-1.3B checkpoint found" in done.stderr
    assert "DEMO" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def parse(*argv):
    return params_from_args(build_parser().parse_args(["--prompt", PROMPT, *argv]))


@pytest.mark.parametrize(
    ("argv", "offload_model", "t5_cpu"),
    [
        ([], True, False),
        (["--offload_model"], True, False),
        (["--t5_cpu"], True, True),
        (["--t5_cpu", "false", "--offload_model"], True, False),
        (["--offload_model", "--t5_cpu", "false"], True, False),
        (["--offload_model", "No", "--t5_cpu", "YES"], False, True),
        (["--offload_model", "0", "--t5_cpu", "1"], False, True),
    ],
)
def test_booleans_take_the_bare_flag_or_a_value(argv, offload_model, t5_cpu):
    params = parse(*argv)
    assert (params.offload_model, params.t5_cpu) == (offload_model, t5_cpu)


def test_flags_map_onto_generation_params():
    flags = "--negative_prompt blurry --size 480x832 --frame_num 17 --sample_steps 4 --sample_shift 5 --lora ink.safetensors"
    params = parse(*flags.split(), "--sample_guide_scale", "4.5", "--base_seed", "7", "--lora_scale", "0.5")
    expected = GenerationParams(
        prompt=PROMPT,
        negative_prompt="blurry",
        size="480*832",
        frame_num=17,
        sample_steps=4,
        sample_shift=5.0,
        sample_guide_scale=4.5,
        seed=7,
        lora=CLI_ADAPTER,  # the path is loaded under this name
        lora_scale=0.5,
        offload_model=True,
        t5_cpu=False,
    )
    assert params == expected


def test_flags_left_out_take_the_official_defaults():
    assert parse() == GenerationParams(prompt=PROMPT, offload_model=True, t5_cpu=False)


def test_prompt_is_required():
    with pytest.raises(ValidationError) as caught:
        params_from_args(build_parser().parse_args([]))
    assert describe_errors(caught.value).startswith("prompt: required")


def test_ckpt_dir_and_model_are_mutually_exclusive(capsys):
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(["--ckpt_dir", "Wan2.1-T2V-1.3B", "--model", "demo", "--prompt", PROMPT])
    assert caught.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


def test_default_save_file_is_derived_from_size_prompt_and_time():
    params = GenerationParams(prompt="a fox / a hare in the snow at dawn, seen from far above the treeline")
    name = default_save_file(params, datetime(2025, 2, 25, 9, 30, 5))
    # spaces and slashes become "_" and the prompt part stops at 50 characters, as in generate.py
    assert name == Path("t2v-1.3B_832x480_a_fox___a_hare_in_the_snow_at_dawn,_seen_from_far__20250225_093005.mp4")


SMALL = ["--frame_num", "5", "--sample_steps", "2", "--base_seed", "7"]


def test_lora_file_changes_the_video_and_scale_zero_gives_the_base_video(cli_env, tmp_path):
    adapter = saved(random_adapter(build_transformer(), 21), tmp_path / "style.safetensors")
    run_demo(cli_env, tmp_path, *SMALL, "--save_file", "base.mp4")
    run_demo(cli_env, tmp_path, *SMALL, "--lora", str(adapter), "--save_file", "styled.mp4")
    run_demo(cli_env, tmp_path, *SMALL, "--lora", str(adapter), "--lora_scale", "0", "--save_file", "unscaled.mp4")
    base, styled, unscaled = (read_mp4(tmp_path / name)[0].astype(np.int16) for name in ("base.mp4", "styled.mp4", "unscaled.mp4"))
    assert np.abs(styled - base).mean() > 2  # the adapter moved the pixels
    np.testing.assert_array_equal(unscaled, base)  # scale 0 adds exact zeros: the base video


def test_a_missing_or_unfitting_lora_exits_naming_the_file(cli_env, tmp_path):
    missing = tmp_path / "missing.safetensors"
    done = run_cli(cli_env, tmp_path, "--model", "demo", "--prompt", PROMPT, *SMALL, "--lora", str(missing))
    assert done.returncode == 1
    assert f"error: LoRA adapter {missing}: no such file or folder" in done.stderr
    assert "Traceback" not in done.stderr

    # Rank-4 weights for a Linear of another width: readable, but it fits no layer of the model.
    alien = saved({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 7),
                   "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(7, 4)}, tmp_path / "alien.safetensors")
    done = run_cli(cli_env, tmp_path, "--model", "demo", "--prompt", PROMPT, *SMALL, "--lora", str(alien))
    assert done.returncode == 1
    assert f"({alien}) does not match the model" in done.stderr
    assert "Traceback" not in done.stderr
    assert not list(tmp_path.glob("*.mp4"))

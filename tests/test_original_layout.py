"""The original Wan2.1 release folder loads offline into exactly the models the diffusers folder gives.

One tiny random model is written twice: as a diffusers folder and, through the inverse key mappings,
as a release folder (release file names, release tensor names, release config.json). Whatever is
loaded or generated from the two must be identical, bit for bit; only the MP4 from the CLI is
compared as a video.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers, convert_wan_vae_to_diffusers
from safetensors.torch import load_file, save_file

from pipeline import demo, original
from pipeline.convert import main as convert_main
from pipeline.convert import wan_pipeline
from pipeline.generator import VideoModel
from pipeline.loading import (
    ModelNotFound,
    detect_layout,
    load_text_encoder,
    load_transformer,
    load_vae,
    resolve_model_source,
)
from pipeline.params import GenerationParams
from pipeline.text import PromptEncoder
from pipeline.video import read_mp4, write_mp4

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]
CLI_TEXT_DTYPE = torch.bfloat16  # what `python -m pipeline` encodes a real checkpoint's prompts in
PARAMS = GenerationParams(prompt="a red fox in the snow", size="832*480", frame_num=5, sample_steps=2, seed=11)


@pytest.fixture(scope="module")
def tiny_pipeline():
    """The demo architecture, but with the real VAE layout (2 residual blocks per stage) at width 2."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        tokenizer = demo.build_tokenizer()
        return wan_pipeline(
            tokenizer,
            demo.build_text_encoder(len(tokenizer)),
            demo.build_transformer(demo.TEXT_DIM),
            demo.build_vae(base_dim=2, num_res_blocks=2),
        )


@pytest.fixture(scope="module")
def release_folder(tmp_path_factory, tiny_pipeline) -> Path:
    return write_release_folder(tmp_path_factory.mktemp("release") / "Wan2.1-T2V-1.3B", tiny_pipeline)


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory, tiny_pipeline) -> Path:
    return demo.save_diffusers_folder(tiny_pipeline, tmp_path_factory.mktemp("diffusers") / "model", demo=False)


@pytest.fixture(scope="module")
def diffusers_frames(diffusers_folder) -> np.ndarray:
    return generate(diffusers_folder)


def write_release_folder(folder: Path, pipe) -> Path:
    return original.save_release_folder(
        folder,
        tokenizer=pipe.tokenizer,
        text_encoder_state=pipe.text_encoder.state_dict(),
        transformer_state=pipe.transformer.state_dict(),
        transformer_config=dict(pipe.transformer.config),
        vae_state=pipe.vae.state_dict(),
    )


def load_parts(folder: Path, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    source = resolve_model_source(str(folder))
    return {
        "text_encoder": load_text_encoder(source, CPU, dtype)[1],
        "transformer": load_transformer(source, dtype),
        "vae": load_vae(source, dtype),
    }


def realigned(model: torch.nn.Module) -> torch.nn.Module:
    """The model with every tensor copied to fresh (64-byte aligned) memory.

    CPU kernels round differently for weights that are not 16-byte aligned, and a safetensors file's
    tensors sit wherever its header length puts them; after the copy the result depends on the
    weights' values alone, which is what these tests compare.
    """
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        tensor.data = tensor.data.clone()
    return model


def prompt_encoder(folder: Path, dtype: torch.dtype) -> PromptEncoder:
    tokenizer, encoder = load_text_encoder(resolve_model_source(str(folder)), CPU, dtype)
    return PromptEncoder(tokenizer, realigned(encoder), CPU)


def generate(folder: Path) -> np.ndarray:
    """The serving path: the text stage, then the video stage, each loading only its own parts."""
    source = resolve_model_source(str(folder))
    context, negative = prompt_encoder(folder, CLI_TEXT_DTYPE).encode([PARAMS.prompt, PARAMS.effective_negative_prompt])
    transformer, vae = load_transformer(source, torch.float32), load_vae(source, torch.float32)
    return VideoModel(realigned(transformer), realigned(vae), CPU).generate(PARAMS, context, negative).frames


def assert_same_weights(ours: torch.nn.Module, reference: torch.nn.Module) -> None:
    ours_state, reference_state = ours.state_dict(), reference.state_dict()
    assert ours_state.keys() == reference_state.keys()
    for name, tensor in reference_state.items():
        assert ours_state[name].dtype == tensor.dtype, name
        assert torch.equal(ours_state[name], tensor), name


def copy_with(folder: Path, destination: Path, file_name: str, state: dict) -> Path:
    """A copy of a release folder with one weights file replaced."""
    shutil.copytree(folder, destination)
    if file_name.endswith(".safetensors"):
        save_file(state, destination / file_name)
    else:
        torch.save(state, destination / file_name)
    return destination


# --- layout -------------------------------------------------------------------------------------


def test_release_folder_is_detected_as_original(release_folder):
    assert detect_layout(release_folder) == "original"
    assert resolve_model_source(str(release_folder)).layout == "original"


def test_incomplete_release_folder_names_found_and_missing_files(release_folder, tmp_path):
    incomplete = tmp_path / "incomplete"
    shutil.copytree(release_folder, incomplete)
    (incomplete / original.VAE_WEIGHTS).unlink()
    with pytest.raises(ModelNotFound) as raised:
        resolve_model_source(str(incomplete))
    message = str(raised.value)
    assert f"missing for the original layout: {original.VAE_WEIGHTS}" in message
    assert original.DIT_WEIGHTS in message and original.T5_WEIGHTS in message  # listed as found


# --- tensor names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("part", "to_release", "to_diffusers"),
    [
        ("transformer", original.transformer_to_release, convert_wan_transformer_to_diffusers),
        ("vae", original.vae_to_release, convert_wan_vae_to_diffusers),
    ],
)
def test_release_names_invert_the_diffusers_converters(tiny_pipeline, part, to_release, to_diffusers):
    state = getattr(tiny_pipeline, part).state_dict()
    back = to_diffusers(dict(to_release(state)))
    assert back.keys() == state.keys()
    assert all(back[name] is state[name] for name in state)


@pytest.mark.parametrize(
    ("listed_as", "named"),
    [("unexpected", "blocks.0.attn.extra.weight"), ("missing", "blocks.1.ffn.fc1.weight")],
)
def test_umt5_name_mismatch_lists_the_name(release_folder, tmp_path, listed_as, named):
    state = torch.load(release_folder / original.T5_WEIGHTS, weights_only=True)
    if listed_as == "unexpected":
        state[named] = torch.zeros(2)
    else:
        del state[named]
    broken = copy_with(release_folder, tmp_path / "broken", original.T5_WEIGHTS, state)
    with pytest.raises(original.KeyMismatch, match=f"{listed_as}: {named}"):
        original.load_text_encoder(broken, CPU, torch.float32)


def test_dit_missing_tensor_is_named_not_left_on_meta(release_folder, tmp_path):
    state = load_file(release_folder / original.DIT_WEIGHTS)
    del state["blocks.1.cross_attn.norm_k.weight"]
    broken = copy_with(release_folder, tmp_path / "broken", original.DIT_WEIGHTS, state)
    with pytest.raises(original.KeyMismatch, match="missing: blocks.1.cross_attn.norm_k.weight"):
        original.load_transformer(broken, torch.float32)


# --- same models, same video --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_both_layouts_load_the_same_weights(release_folder, diffusers_folder, dtype):
    """bfloat16 too: the DiT modules diffusers keeps in float32 must stay float32 from the release file."""
    ours, reference = load_parts(release_folder, dtype), load_parts(diffusers_folder, dtype)
    for part in reference:
        assert_same_weights(ours[part], reference[part])
    assert ours["transformer"].config.text_dim == demo.TEXT_DIM
    assert ours["vae"].config.base_dim == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_both_layouts_encode_prompts_identically(release_folder, diffusers_folder, dtype):
    texts = [PARAMS.prompt, PARAMS.effective_negative_prompt]
    ours = prompt_encoder(release_folder, dtype).encode(texts)
    reference = prompt_encoder(diffusers_folder, dtype).encode(texts)
    for ours_embeds, reference_embeds in zip(ours, reference):
        assert torch.equal(ours_embeds, reference_embeds)


def test_both_layouts_generate_identical_frames(release_folder, diffusers_frames):
    assert np.array_equal(generate(release_folder), diffusers_frames)


# --- conversion ---------------------------------------------------------------------------------


def test_convert_writes_a_diffusers_folder_with_identical_frames(release_folder, diffusers_frames, tmp_path):
    converted = tmp_path / "converted"
    command = [sys.executable, "-m", "pipeline.convert", str(release_folder), str(converted)]
    subprocess.run(command, cwd=REPO, check=True, timeout=120)
    assert detect_layout(converted) == "diffusers"
    assert np.array_equal(generate(converted), diffusers_frames)


def test_convert_refuses_an_existing_destination(release_folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        convert_main([str(release_folder), str(tmp_path)])
    assert exited.value.code == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.skipif(not (REPO / "pipeline" / "__main__.py").exists(), reason="no `python -m pipeline` here")
def test_cli_ckpt_dir_release_folder_gives_the_diffusers_folders_video(release_folder, diffusers_frames, tmp_path):
    """Compared through MP4 on both sides. The CLI's weights are not realigned (see `realigned`), so a
    few values may round one step apart before encoding: the videos must agree, not every byte."""
    video = tmp_path / "release.mp4"
    flags = ["--prompt", PARAMS.prompt, "--size", PARAMS.size, "--frame_num", str(PARAMS.frame_num)]
    flags += ["--sample_steps", str(PARAMS.sample_steps), "--base_seed", str(PARAMS.seed), "--device", "cpu"]
    command = [sys.executable, "-m", "pipeline", "--ckpt_dir", str(release_folder), *flags, "--save_file", str(video)]
    subprocess.run(command, cwd=REPO, check=True, timeout=120)
    ours, _ = read_mp4(video)
    reference, _ = read_mp4(write_mp4(diffusers_frames, tmp_path / "diffusers.mp4"))
    assert ours.shape == reference.shape
    assert np.abs(ours.astype(np.int16) - reference).mean() < 0.01


KEY_OF_FOLDER = """
import sys, torch
from pipeline.generator import VideoModel
from pipeline.loading import resolve_model_source
from pipeline.params import GenerationParams
print(VideoModel.load(resolve_model_source(sys.argv[1]), torch.device("cpu")).compile_cache_key(GenerationParams(prompt="-")))
"""


def test_the_compile_cache_key_is_the_same_in_every_process(release_folder):
    """Loaded from a release folder, a config lists its defaulted fields in a set's order, which follows
    the process's hash seed: the key must not (on an H200 each start got a new key and compiled again)."""
    keys = set()
    for seed in ("1", "2"):
        done = subprocess.run([sys.executable, "-c", KEY_OF_FOLDER, str(release_folder)], cwd=Path(__file__).resolve().parents[1],
                              env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        keys.add(done.stdout.strip().splitlines()[-1])
    assert len(keys) == 1, keys

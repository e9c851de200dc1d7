"""The original Wan2.1 release folder (the seed's `--ckpt_dir ../Wan2.1-T2V-1.3B`), loaded offline.

The release has its own file and tensor names: the DiT as `diffusion_pytorch_model.safetensors` with
a `config.json` in Wan's own format, the umT5-XXL encoder as a bare `.pth` state dict, the VAE as
`Wan2.1_VAE.pth`. Each model's config comes from the folder itself (the release config, the tensor
shapes) laid over the bundled 1.3B configs in `pipeline/configs/`, so nothing is ever fetched and a
model of any size loads. The DiT and the VAE go through diffusers' single-file converters; the umT5
names are mapped here, strictly.

The inverse mappings (diffusers names -> release names) live here too, next to what they invert:
the tests and the load benchmark write release-layout folders with them.
"""

from __future__ import annotations

import functools
import json
import re
import tempfile
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

from pipeline.diffusers_compat import float32_module_names
from pipeline.release_files import ORIGINAL_FILES
from pipeline.text import MAX_TEXT_TOKENS

RELEASE_CONFIG, DIT_WEIGHTS, T5_WEIGHTS, VAE_WEIGHTS, TOKENIZER_DIR = ORIGINAL_FILES
CONFIGS = Path(__file__).parent / "configs"

# Release config.json key -> diffusers config key; `dim` is split into heads x head width separately.
RELEASE_DIT_KEYS = {
    "num_heads": "num_attention_heads",
    "ffn_dim": "ffn_dim",
    "freq_dim": "freq_dim",
    "num_layers": "num_layers",
    "in_dim": "in_channels",
    "out_dim": "out_channels",
    "eps": "eps",
}

# Release umT5 name <-> transformers name; `{i}` is the block index. umT5 (unlike T5) has a relative
# position table in every block. The token embedding feeds `shared` and the tied `encoder.embed_tokens`.
UMT5_NAMES = (
    ("token_embedding.weight", "shared.weight"),
    ("token_embedding.weight", "encoder.embed_tokens.weight"),
    ("norm.weight", "encoder.final_layer_norm.weight"),
    *((f"blocks.{{i}}.attn.{p}.weight", f"encoder.block.{{i}}.layer.0.SelfAttention.{p}.weight") for p in "qkvo"),
    (
        "blocks.{i}.pos_embedding.embedding.weight",
        "encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight",
    ),
    ("blocks.{i}.norm1.weight", "encoder.block.{i}.layer.0.layer_norm.weight"),
    ("blocks.{i}.norm2.weight", "encoder.block.{i}.layer.1.layer_norm.weight"),
    ("blocks.{i}.ffn.gate.0.weight", "encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight"),
    ("blocks.{i}.ffn.fc1.weight", "encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight"),
    ("blocks.{i}.ffn.fc2.weight", "encoder.block.{i}.layer.1.DenseReluDense.wo.weight"),
)
UMT5_RELEASE_NAMES = tuple((hf, release) for release, hf in UMT5_NAMES)


class KeyMismatch(ValueError):
    """A checkpoint's tensor names differ from the model's; the message lists every one that differs."""


def bundled_config(name: str) -> dict:
    """One of the shipped Wan2.1-T2V-1.3B configs: `transformer`, `vae` or `text_encoder`."""
    return json.loads((CONFIGS / f"{name}.json").read_text())


# --- loading -----------------------------------------------------------------------------------------


def load_text_encoder(folder: Path, device: torch.device, dtype: torch.dtype):
    """Tokenizer + umT5 encoder from the release `.pth`.

    The file is memory-mapped and the model built on the meta device, so each tensor is cast straight
    onto `device` once and assigned: no randomly initialised model, no second full copy in RAM.
    """
    tokenizer = AutoTokenizer.from_pretrained(folder / TOKENIZER_DIR, local_files_only=True)
    path = folder / T5_WEIGHTS
    release_state = mapped_state(path)
    config = umt5_config({key: tuple(tensor.shape) for key, tensor in release_state.items()})
    with init_empty_weights():
        model = UMT5EncoderModel(config)
    expected = {name for key in model.state_dict() for name in renamed(key, UMT5_RELEASE_NAMES)}
    check_keys(path, found=set(release_state), expected=expected)
    state = {}
    for key in list(release_state):
        tensor = release_state.pop(key).to(device=device, dtype=dtype)
        for name in renamed(key, UMT5_NAMES):
            state[name] = tensor
    model.load_state_dict(state, strict=True, assign=True)
    return tokenizer, model.eval().requires_grad_(False)


def load_transformer(folder: Path, dtype: torch.dtype) -> WanTransformer3DModel:
    config = transformer_config(folder)
    return from_single_file(WanTransformer3DModel, folder / DIT_WEIGHTS, config, dtype, transformer_to_release)


def load_vae(folder: Path, dtype: torch.dtype) -> AutoencoderKLWan:
    return from_single_file(AutoencoderKLWan, folder / VAE_WEIGHTS, vae_config(folder), dtype, vae_to_release)


def from_single_file(model_class, weights: Path, config: dict, dtype: torch.dtype, release_names):
    """diffusers' converter for the release names, reading the derived config from a private temp dir.

    The names are checked first: diffusers would leave a tensor the file lacks on the meta device, to
    fail later with a meta-tensor error that names nothing. diffusers loads in float32 (the empty
    model's dtype) and the cast to `dtype` is done here the way `from_pretrained` does it, so the
    modules diffusers keeps in float32 (the DiT's norms, time embedder, modulation) stay float32 and
    both layouts load into the same model.
    """
    with init_empty_weights():
        empty = model_class.from_config(config)
    check_keys(weights, found=set(tensor_shapes(weights)), expected=set(release_names(empty.state_dict())))
    with tempfile.TemporaryDirectory(prefix="wan-config-") as config_dir:
        (Path(config_dir) / "config.json").write_text(json.dumps(config))
        model = model_class.from_single_file(str(weights), config=config_dir, local_files_only=True, torch_dtype=None)
    keep_in_float32 = float32_module_names(model)
    for name, parameter in model.named_parameters():
        if not any(module in name.split(".") for module in keep_in_float32):
            parameter.data = parameter.data.to(dtype)
    return model.eval().requires_grad_(False)


# --- configs from the folder ----------------------------------------------------------------------


def transformer_config(folder: Path) -> dict:
    """The release config.json in diffusers' terms; text_dim (not recorded there) from the text embedding."""
    release = json.loads((folder / RELEASE_CONFIG).read_text())
    absent = [key for key in ("dim", *RELEASE_DIT_KEYS) if key not in release]
    if absent:
        raise KeyMismatch(f"{folder / RELEASE_CONFIG}: missing {', '.join(absent)}")
    config = bundled_config("transformer")
    config.update({ours: release[theirs] for theirs, ours in RELEASE_DIT_KEYS.items()})
    config["attention_head_dim"] = release["dim"] // release["num_heads"]
    text_embedding = tensor_shapes(folder / DIT_WEIGHTS).get("text_embedding.0.weight")  # [dim, text_dim]
    if text_embedding:
        config["text_dim"] = text_embedding[1]
    return config


def vae_config(folder: Path) -> dict:
    """The bundled Wan VAE config at the file's width (diffusers' converter fixes the rest of the layout)."""
    config = bundled_config("vae")
    first_conv = tensor_shapes(folder / VAE_WEIGHTS).get("encoder.conv1.weight")  # [base_dim, 3, 3, 3, 3]
    if first_conv:
        config["base_dim"] = first_conv[0]
    return config


def umt5_config(shapes: dict[str, tuple[int, ...]]) -> UMT5Config:
    """The bundled umT5-XXL config with every size the tensors show replaced by what they show."""
    config = bundled_config("text_encoder")
    config.pop("model_type")
    if embedding := shapes.get("token_embedding.weight"):
        config["vocab_size"], config["d_model"] = embedding
    blocks = [int(key.split(".")[1]) for key in shapes if key.startswith("blocks.")]
    if blocks:
        config["num_layers"] = max(blocks) + 1
    if position_table := shapes.get("blocks.0.pos_embedding.embedding.weight"):
        config["relative_attention_num_buckets"], config["num_heads"] = position_table
    if query := shapes.get("blocks.0.attn.q.weight"):
        config["d_kv"] = query[0] // config["num_heads"]
    if feed_forward := shapes.get("blocks.0.ffn.fc1.weight"):
        config["d_ff"] = feed_forward[0]
    return UMT5Config(**config)


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape, read without loading the data (safetensors header, memory-mapped .pth)."""
    if path.suffix == ".safetensors":
        with safe_open(path, framework="pt") as weights:
            return {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}
    return {key: tuple(tensor.shape) for key, tensor in mapped_state(path).items()}


def mapped_state(path: Path) -> dict[str, torch.Tensor]:
    """A `.pth` state dict, memory-mapped: a tensor's bytes are read only when it is used."""
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


# --- tensor names ---------------------------------------------------------------------------------


def renamed(key: str, pairs: tuple[tuple[str, str], ...]) -> list[str]:
    """Every name `key` maps to through (from, to) templates; empty when no template matches."""
    names = []
    for source, target in pairs:
        match = _template_pattern(source).fullmatch(key)
        if match:
            names.append(target.format(**match.groupdict()))
    return names


@functools.cache
def _template_pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)"))


def check_keys(path: Path, *, found: set[str], expected: set[str]) -> None:
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise KeyMismatch(
            f"{path}: tensor names do not match the model; "
            f"missing: {', '.join(missing) or 'none'}; unexpected: {', '.join(unexpected) or 'none'}"
        )


# --- writing the release layout (tests, load benchmark) ------------------------------------------

# diffusers DiT name fragment -> release one, applied in order: the inverse of diffusers'
# `convert_wan_transformer_to_diffusers` for text-to-video (whose norm2 is the release's norm3).
DIT_RELEASE_FRAGMENTS = (
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    (".attn1.", ".self_attn."),
    (".attn2.", ".cross_attn."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    (".to_out.0.", ".o."),
    (".norm2.", ".norm3."),
    (".ffn.net.0.proj.", ".ffn.0."),
    (".ffn.net.2.", ".ffn.2."),
    ("proj_out.", "head.head."),
    ("scale_shift_table", "modulation"),
)

# Inverse of diffusers' `convert_wan_vae_to_diffusers`. A residual block's parts first, then module
# paths; the decoder's release list holds, per stage, three residual blocks and then the upsampler.
VAE_RESIDUAL_PARTS = {
    "norm1": "residual.0",
    "conv1": "residual.2",
    "norm2": "residual.3",
    "conv2": "residual.6",
    "conv_shortcut": "shortcut",
}
VAE_RELEASE_PATHS = (
    (r"^quant_conv\.", "conv1."),
    (r"^post_quant_conv\.", "conv2."),
    (r"\.conv_in\.", ".conv1."),
    (r"\.norm_out\.", ".head.0."),
    (r"\.conv_out\.", ".head.2."),
    (r"\.mid_block\.resnets\.0\.", ".middle.0."),
    (r"\.mid_block\.attentions\.0\.", ".middle.1."),
    (r"\.mid_block\.resnets\.1\.", ".middle.2."),
    (r"^encoder\.down_blocks\.", "encoder.downsamples."),
    (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}."),
    (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.upsamples.{4 * int(m[1]) + 3}."),
)


def transformer_to_release(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    release = {}
    for key, tensor in state.items():
        name = "head.modulation" if key == "scale_shift_table" else key
        for fragment, replacement in DIT_RELEASE_FRAGMENTS:
            name = name.replace(fragment, replacement)
        release[name] = tensor
    return release


def vae_to_release(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    release = {}
    for key, tensor in state.items():
        name = re.sub(
            r"((?:resnets|down_blocks)\.\d+\.)(" + "|".join(VAE_RESIDUAL_PARTS) + r")\.",
            lambda m: f"{m[1]}{VAE_RESIDUAL_PARTS[m[2]]}.",
            key,
        )
        for pattern, replacement in VAE_RELEASE_PATHS:
            name = re.sub(pattern, replacement, name)
        release[name] = tensor
    return release


def umt5_to_release(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tied `shared` / `encoder.embed_tokens` both land on the one `token_embedding`."""
    return {name: tensor for key, tensor in state.items() for name in renamed(key, UMT5_RELEASE_NAMES)}


def release_config(transformer_config: dict) -> dict:
    """A diffusers DiT config as the release's config.json, which records only these keys."""
    config = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": "t2v"}
    config["text_len"] = MAX_TEXT_TOKENS
    config.update({theirs: transformer_config[ours] for theirs, ours in RELEASE_DIT_KEYS.items()})
    config["dim"] = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
    return config


def save_release_folder(
    folder: Path,
    *,
    tokenizer,
    text_encoder_state: dict[str, torch.Tensor],
    transformer_state: dict[str, torch.Tensor],
    transformer_config: dict,
    vae_state: dict[str, torch.Tensor],
) -> Path:
    """Write diffusers-named weights, in their own dtypes, as an original Wan2.1 release folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RELEASE_CONFIG).write_text(json.dumps(release_config(transformer_config), indent=2))
    save_file(transformer_to_release(transformer_state), folder / DIT_WEIGHTS)
    torch.save(umt5_to_release(text_encoder_state), folder / T5_WEIGHTS)
    torch.save(vae_to_release(vae_state), folder / VAE_WEIGHTS)
    tokenizer.save_pretrained(folder / TOKENIZER_DIR)
    return folder

"""Where the weights come from and how each stage loads only its own part of them.

A model spec is `auto`, `demo`, a folder (diffusers layout or the original Wan release layout) or a
Hugging Face repo id. `resolve_model_source` turns it into a local folder once; the text stage and
the video stage then load only their components from it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from pipeline import demo
from pipeline.release_files import ORIGINAL_FILES

log = logging.getLogger(__name__)

HUB_ID = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
AUTO_FOLDERS = ("Wan2.1-T2V-1.3B", "Wan2.1-T2V-1.3B-Diffusers")
DIFFUSERS_PARTS = ("model_index.json", "transformer", "vae", "text_encoder", "tokenizer")

Layout = Literal["diffusers", "original"]


class ModelNotFound(RuntimeError):
    """No usable checkpoint; the message lists every place that was tried and why it failed."""


@dataclass(frozen=True)
class ModelSource:
    folder: Path
    layout: Layout
    model_id: str  # what the API reports: the hub id, the folder name or "demo"
    origin: str  # how it was found, e.g. "$WAN_CKPT_DIR", "hub cache", "built-in demo"
    is_demo: bool

    def describe(self) -> dict:
        """What the API may show of the model: not its folder, a path on the server."""
        return {
            "id": self.model_id,
            "source": self.origin,
            "layout": self.layout,
            "demo_model": self.is_demo,
        }


def detect_layout(folder: Path) -> Layout:
    """Tell the two checkpoint layouts apart; anything else is one error naming found and missing files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelNotFound(f"{folder}: not a directory")
    if (folder / "model_index.json").is_file():
        missing = [part for part in DIFFUSERS_PARTS if not (folder / part).exists()]
        if missing:
            raise ModelNotFound(f"{folder}: diffusers layout is missing {', '.join(missing)}")
        return "diffusers"
    present = [name for name in ORIGINAL_FILES if (folder / name).exists()]
    if present and len(present) == len(ORIGINAL_FILES):
        return "original"
    found = sorted(p.name for p in folder.iterdir())[:20]
    missing = [name for name in ORIGINAL_FILES if name not in present]
    raise ModelNotFound(
        f"{folder}: neither a diffusers folder (no model_index.json) nor a complete original Wan2.1 folder; "
        f"found {found or 'nothing'}; missing for the original layout: {', '.join(missing)}"
    )


def local_source(folder: Path, origin: str) -> ModelSource:
    folder = Path(folder).resolve()
    is_demo = demo.is_demo_folder(folder)
    return ModelSource(
        folder=folder,
        layout=detect_layout(folder),
        model_id="demo" if is_demo else folder.name,
        origin=origin,
        is_demo=is_demo,
    )


def hub_source(repo_id: str) -> ModelSource:
    """A hub repo, from the local cache first; online only when HF_HUB_OFFLINE is unset, and quickly."""
    from huggingface_hub import is_offline_mode, snapshot_download

    try:
        folder = snapshot_download(repo_id, local_files_only=True)
        return ModelSource(Path(folder), "diffusers", repo_id, "hub cache", False)
    except Exception as cached_error:  # noqa: BLE001 - any failure means "not usable from the cache"
        if is_offline_mode():
            raise ModelNotFound(f"{repo_id}: not in the Hugging Face cache and HF_HUB_OFFLINE is set") from cached_error
    try:
        folder = snapshot_download(repo_id, etag_timeout=5)
    except Exception as error:  # noqa: BLE001 - network, auth and missing repo all end here
        raise ModelNotFound(f"{repo_id}: hub unreachable or repo unavailable ({type(error).__name__}: {error})") from error
    return ModelSource(Path(folder), "diffusers", repo_id, "hub", False)


def resolve_model_source(spec: str = "auto", *, allow_demo: bool = False, cache_dir: Path | None = None) -> ModelSource:
    """Turn a model spec into a local checkpoint folder, or fail with everything that was tried."""
    if spec == "demo":
        if not allow_demo:
            raise ModelNotFound("model 'demo' requested but allow_demo is false")
        return _demo_source(cache_dir)
    if spec != "auto":
        if Path(spec).exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
            return local_source(Path(spec).expanduser(), "path")
        return hub_source(spec)

    tried: list[str] = []
    candidates: list[tuple[str, Path]] = []
    if os.environ.get("WAN_CKPT_DIR"):
        candidates.append(("$WAN_CKPT_DIR", Path(os.environ["WAN_CKPT_DIR"])))
    candidates += [(f"./{name}", Path(name)) for name in AUTO_FOLDERS]
    for origin, folder in candidates:
        if not folder.exists():
            tried.append(f"{origin}: {folder} does not exist")
            continue
        try:
            return local_source(folder, origin)
        except ModelNotFound as error:
            tried.append(f"{origin}: {error}")
    try:
        return hub_source(HUB_ID)
    except ModelNotFound as error:
        tried.append(f"hub: {error}")
    if allow_demo:
        log.warning("No Wan2.1 checkpoint found (%s); falling back to the built-in DEMO model", "; ".join(tried))
        return _demo_source(cache_dir)
    raise ModelNotFound("no Wan2.1-T2V-1.3B checkpoint found; tried: " + "; ".join(tried) + "; the demo model is no fallback here (allow_demo is off)")


def _demo_source(cache_dir: Path | None) -> ModelSource:
    folder = demo.demo_folder(cache_dir)
    return ModelSource(folder, "diffusers", "demo", "built-in demo", True)


def resolve_device(spec: str = "auto") -> torch.device:
    """`auto` = CUDA when present, else CPU. An explicit `cpu` never touches the GPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def parse_dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}; allowed: {', '.join(dtypes)}")
    return dtypes[name]


def default_text_dtype(source: ModelSource) -> torch.dtype:
    """bf16 for real umT5-XXL on any device, fp32 for the tiny demo.

    5.7B parameters in fp32 would need 23 GB of RAM, and on 16 CPU cores bf16 is also the faster
    (the `text` section of bench/results/archive/nvidia-h100-80gb-hbm3-2026-11-26-fast-v2.json).
    """
    return torch.float32 if source.is_demo else torch.bfloat16


def load_text_encoder(source: ModelSource, device: torch.device, dtype: torch.dtype):
    """Tokenizer and umT5 encoder only: the text stage never loads the DiT or the VAE."""
    if source.layout == "original":
        from pipeline import original

        return original.load_text_encoder(source.folder, device, dtype)
    from transformers import AutoTokenizer, UMT5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(source.folder / "tokenizer")
    encoder = UMT5EncoderModel.from_pretrained(source.folder / "text_encoder", dtype=dtype)
    return tokenizer, encoder.to(device).eval().requires_grad_(False)


def attention_heads(source: ModelSource) -> int | None:
    """The DiT's attention heads, from its config file alone (the app builder checks a Ulysses degree
    against them before any replica starts); None where the folder is not on this machine."""
    config = source.folder / ORIGINAL_FILES[0] if source.layout == "original" else source.folder / "transformer" / "config.json"
    if not config.is_file():
        return None
    found = json.loads(config.read_text())
    return found.get("num_heads" if source.layout == "original" else "num_attention_heads")


def load_transformer(source: ModelSource, dtype: torch.dtype):
    """The DiT, on the CPU: where it then lives is the memory policy's decision."""
    if source.layout == "original":
        from pipeline import original

        return original.load_transformer(source.folder, dtype)
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel.from_pretrained(source.folder / "transformer", torch_dtype=dtype)
    return model.eval().requires_grad_(False)


def load_vae(source: ModelSource, dtype: torch.dtype):
    if source.layout == "original":
        from pipeline import original

        return original.load_vae(source.folder, dtype)
    from diffusers import AutoencoderKLWan

    model = AutoencoderKLWan.from_pretrained(source.folder / "vae", torch_dtype=dtype)
    return model.eval().requires_grad_(False)

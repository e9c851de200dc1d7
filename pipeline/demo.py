"""The built-in `demo` model: a tiny, randomly initialised Wan2.1 with a tokenizer built in code.

It has the real architecture (diffusers' WanTransformer3DModel and AutoencoderKLWan, transformers'
UMT5EncoderModel) at toy widths, so the whole service runs on a CPU with no download. Its videos are
noise-like: it exists to exercise the serving path, and everything it serves is marked as demo.
It is written once to a real diffusers-format folder and then loaded like any checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # diffusers and transformers are imported where a demo model is built: finding a
    # checkpoint (pipeline.loading, in `serve run`'s app builder) must not pay seconds for them.
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
    from transformers import PreTrainedTokenizerFast, UMT5EncoderModel

log = logging.getLogger(__name__)

DEMO_SEED = 20250225  # fixed, so every machine builds the same demo weights
DEMO_VERSION = "v1"
DEMO_MARKER = "wan_t2v_demo.json"  # present in every folder written from the demo model
TEXT_DIM = 32


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with umT5's special ids (pad 0, eos 1, unk 2): any text, no vocab file."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(specials + sorted(alphabet))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def build_text_encoder(vocab_size: int) -> UMT5EncoderModel:
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tie_word_embeddings=False,
    )
    return UMT5EncoderModel(config).eval()


def build_transformer(text_dim: int = TEXT_DIM) -> WanTransformer3DModel:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        text_dim=text_dim,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
    ).eval()


def build_vae(base_dim: int = 2, num_res_blocks: int = 1) -> AutoencoderKLWan:
    """Real Wan VAE topology (8x spatial, 4x temporal, 16 latent channels) at a toy width."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=base_dim, z_dim=16, num_res_blocks=num_res_blocks).eval()


def build_demo_pipeline() -> WanPipeline:
    from diffusers import UniPCMultistepScheduler, WanPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DEMO_SEED)
        tokenizer = build_tokenizer()
        text_encoder = build_text_encoder(len(tokenizer))
        transformer = build_transformer()
        vae = build_vae()
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0),
        transformer=transformer,
    )


def save_diffusers_folder(pipe: WanPipeline, folder: Path, *, demo: bool) -> Path:
    """Write a pipeline as a diffusers-format folder, atomically: it appears whole or not at all."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        if demo:
            (staging / DEMO_MARKER).write_text(json.dumps({"demo": True, "version": DEMO_VERSION, "seed": DEMO_SEED}))
        try:
            os.rename(staging, folder)
        except OSError:
            if not (folder / "model_index.json").exists():
                raise
            # Another process (a second replica) finished the same folder first; theirs is identical.
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def demo_folder(cache_dir: Path | None = None) -> Path:
    """The demo checkpoint folder, written on first use into the cache directory."""
    root = Path(cache_dir or os.environ.get("WAN_T2V_CACHE", Path.home() / ".cache" / "wan-t2v-serve"))
    folder = root / f"demo-{DEMO_VERSION}"
    if not (folder / "model_index.json").exists():
        log.warning("Writing the built-in DEMO model (random weights, not Wan2.1) to %s", folder)
        save_diffusers_folder(build_demo_pipeline(), folder, demo=True)
    return folder


def is_demo_folder(folder: Path) -> bool:
    return (Path(folder) / DEMO_MARKER).exists()

"""Time loading an original Wan2.1 release folder through `pipeline.loading`: seconds and peak RSS per part.

    python bench/load_original.py /data/Wan2.1-T2V-1.3B bench/results/load_original.json   # ~18 GB of disk
    python bench/load_original.py /tmp/tiny-release /tmp/load_original.json --tiny          # checks the script

A folder that is not a complete release folder is first written with random weights of the real
shapes (the bundled 1.3B configs) in the release's own dtypes: the DiT and the VAE float32, the
5.7B-parameter umT5-XXL encoder bf16 in one unsharded `.pth`, as the release ships them. Models are
built on the meta device and filled chunk by chunk, so writing holds the weights once and nothing
more. The tokenizer is the demo's stand-in (the real one is not available offline).

Each part then loads in a fresh process, so each peak RSS is that part's alone: first with the
folder's files evicted from the page cache (cold, as after a reboot), then again (warm).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import diffusers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from accelerate import init_empty_weights  # noqa: E402
from diffusers import AutoencoderKLWan, WanTransformer3DModel  # noqa: E402
from transformers import UMT5EncoderModel  # noqa: E402

from pipeline import demo, loading, original  # noqa: E402

PARTS = ("text_encoder", "transformer", "vae")
FILL_CHUNK = 1 << 26  # elements per random fill: bounds the temporaries of the 1B-element embedding


def empty_models(tiny: bool) -> dict[str, torch.nn.Module]:
    """The three models on the meta device: the demo's toy sizes, or the real 1.3B release's."""
    with init_empty_weights():
        if tiny:
            return {
                "text_encoder": demo.build_text_encoder(len(demo.build_tokenizer())),
                "transformer": demo.build_transformer(),
                "vae": demo.build_vae(base_dim=2, num_res_blocks=2),
            }
        return {
            "text_encoder": UMT5EncoderModel(original.umt5_config({})),
            "transformer": WanTransformer3DModel.from_config(original.bundled_config("transformer")),
            "vae": AutoencoderKLWan.from_config(original.bundled_config("vae")),
        }


def random_state(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random tensors of the model's shapes; tied parameters (umT5's embedding) get one tensor."""
    filled: dict[int, torch.Tensor] = {}
    state = {}
    for name, meta in model.state_dict(keep_vars=True).items():
        if id(meta) not in filled:
            tensor = torch.empty(meta.shape, dtype=dtype)
            flat = tensor.view(-1)
            for start in range(0, flat.numel(), FILL_CHUNK):
                flat[start : start + FILL_CHUNK].uniform_(-0.02, 0.02)
            filled[id(meta)] = tensor
        state[name] = filled[id(meta)]
    return state


def write_release_folder(folder: Path, tiny: bool) -> None:
    models = empty_models(tiny)
    original.save_release_folder(
        folder,
        tokenizer=demo.build_tokenizer(),
        text_encoder_state=random_state(models["text_encoder"], torch.bfloat16),
        transformer_state=random_state(models["transformer"], torch.float32),
        transformer_config=dict(models["transformer"].config),
        vae_state=random_state(models["vae"], torch.float32),
    )


def evict_from_page_cache(folder: Path) -> None:
    """Drop the folder's file pages from the page cache (no root needed), so the next read is cold."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def peak_rss_bytes() -> int:
    """This address space's high-water RSS (VmHWM). Not ru_maxrss: Linux carries that across
    fork+exec, so a spawned child would report its parent's peak (20 GB after writing the folder)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024


def time_part(folder: str, part: str, device_name: str) -> dict:
    """One part, loaded as serving loads it (the DiT on the CPU: placing it is the memory policy's job)."""
    device = loading.resolve_device(device_name)
    dtype = {
        "text_encoder": torch.bfloat16,
        "transformer": torch.bfloat16 if device.type == "cuda" else torch.float32,
        "vae": torch.float32,
    }[part]
    rss_before = peak_rss_bytes()
    started = time.perf_counter()
    source = loading.resolve_model_source(folder)
    if part == "text_encoder":
        model = loading.load_text_encoder(source, device, dtype)[1]
    elif part == "transformer":
        model = loading.load_transformer(source, dtype)
    else:
        model = loading.load_vae(source, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {
        "seconds": round(time.perf_counter() - started, 3),
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_rss_before_load_bytes": rss_before,  # the interpreter and its imports
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(next(model.parameters()).device),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def measure(folder: Path, part: str, device: str) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as fresh_process:
        return fresh_process.submit(time_part, str(folder), part, device).result()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time loading an original Wan2.1 release folder.")
    parser.add_argument("folder", type=Path, help="release folder; written first when incomplete")
    parser.add_argument("out", type=Path, help="JSON file for the results")
    parser.add_argument("--tiny", action="store_true", help="toy sizes, to check the script on a laptop")
    parser.add_argument("--device", default="auto", help="where the text encoder loads (auto = cuda when present)")
    args = parser.parse_args(argv)

    write_seconds = None
    try:
        loading.detect_layout(args.folder)
    except loading.ModelNotFound:
        started = time.perf_counter()
        write_release_folder(args.folder, args.tiny)
        write_seconds = round(time.perf_counter() - started, 1)

    parts = {}
    for part in PARTS:
        evict_from_page_cache(args.folder)
        parts[part] = {"cold": measure(args.folder, part, args.device), "warm": measure(args.folder, part, args.device)}
        print(part, json.dumps(parts[part]), flush=True)
    files = sorted(path for path in args.folder.rglob("*") if path.is_file())
    results = {
        "folder": str(args.folder.resolve()),
        "tiny": args.tiny,
        "write_seconds": write_seconds,
        "files": {str(path.relative_to(args.folder)): path.stat().st_size for path in files},
        "host": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
        },
        "parts": parts,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

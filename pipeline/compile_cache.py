"""A persistent, keyed home for torch.compile's caches, so that only a machine's first start compiles.

PyTorch caches compiled graphs (Inductor's FX graph cache, AOTAutograd's cache, Triton kernels and
their autotuning) under `TORCHINDUCTOR_CACHE_DIR` / `TRITON_CACHE_DIR`, by default in /tmp, which a
reboot or a new container empties. It can also bundle what a process compiled into one blob
(`torch.compiler.save_cache_artifacts`) and preload it into a fresh process
(`torch.compiler.load_cache_artifacts`). `CompileCache` keeps both in one folder per key:

    <root>/<key>/inductor/  <root>/<key>/triton/  <root>/<key>/artifacts.bin

The key hashes everything a compiled kernel depends on that PyTorch's own cache keys might not
cover: torch, Triton, diffusers and our pipeline's source, the GPU, the model's configs, the compile
options and the shapes warmed. A new version of any of them starts a new folder; deleting the root is
always safe (the next start compiles again).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
from pathlib import Path

import torch

from pipeline.files import write_atomic

log = logging.getLogger(__name__)

PIPELINE_DIR = Path(__file__).resolve().parent
ARTIFACTS = "artifacts.bin"
# diffusers' cache hooks keep Python state per block and call torch.compiler.disable()d code.
STEP_CACHE_NOT_COMPILABLE = "a step cache and compiled DiT blocks do not combine (diffusers' cache hooks cannot be traced): choose one"


@functools.cache
def source_digest() -> str:
    """Our pipeline's Python source: the graphs torch.compile traces are built from it. Read once per
    process, near when it was imported: an edit on disk later must not move a running replica's key."""
    digest = hashlib.sha256()
    for path in sorted(PIPELINE_DIR.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    import diffusers

    versions = {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version()}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        pass
    return versions


def device_identity(device: torch.device) -> dict[str, str]:
    if device.type != "cuda":
        return {"device": device.type}
    major, minor = torch.cuda.get_device_capability(device)
    return {"device": torch.cuda.get_device_name(device), "capability": f"{major}.{minor}", "cuda": str(torch.version.cuda)}


def cache_key(device: torch.device, model_configs: dict, settings: dict) -> str:
    """sha256 over versions, device, model configs and the compile settings (options, shapes warmed)."""
    parts = {**library_versions(), **device_identity(device), "pipeline": source_digest(),
             "model": model_configs, "settings": settings}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


class CompileCache:
    """One keyed cache folder. `use()` before the first compile, `save()` once the warm-up compiled."""

    def __init__(self, root: str | os.PathLike, key: str):
        self.folder = Path(root).expanduser() / key

    def use(self) -> bool:
        """Point this process's compile caches into the folder and preload its saved artifacts.

        Returns whether artifacts were found (a start after the first). Must run before anything
        compiles: PyTorch reads these locations when it first needs them.
        """
        for name, variable in (("inductor", "TORCHINDUCTOR_CACHE_DIR"), ("triton", "TRITON_CACHE_DIR")):
            (self.folder / name).mkdir(parents=True, exist_ok=True)
            os.environ[variable] = str(self.folder / name)
        artifacts = self.folder / ARTIFACTS
        if not artifacts.is_file():
            return False
        try:
            torch.compiler.load_cache_artifacts(artifacts.read_bytes())
        except Exception as error:  # noqa: BLE001 - a damaged blob costs a compile, never a start
            log.warning("ignoring the compile cache artifacts at %s (%s: %s)", artifacts, type(error).__name__, error)
            return False
        return True

    def save(self) -> int:
        """Write what this process compiled as one artifact blob; returns its size in bytes (0: nothing)."""
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return 0
        blob, _info = saved
        write_atomic(self.folder / ARTIFACTS, blob)
        return len(blob)

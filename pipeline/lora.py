"""LoRA adapters on the Wan DiT, including the rearranged one of pipeline/dit.py, switched per job.

Files are read with diffusers' own machinery: `WanLoraLoaderMixin.lora_state_dict` reads
diffusers/PEFT files and converts the original Wan / ComfyUI key formats. Serving them is ours
(`ServedAdapters`), built for compiled blocks:

- Adapters are *merged* into the weights of the Linears they touch: W = W_base + scale * B @ A, so
  a step costs what the base model's does (the `lora` section of
  bench/results/nvidia-h100-80gb-hbm3-2026-12-05-few-step-lora.json). Unfused LoRA layers (PEFT
  modules hot-swapped in place, diffusers' hot-swap) were measured first and were slower, as every
  Linear then runs two more GEMMs and the FFN's GELU leaves cuBLASLt's epilogue: 1.10x the base
  step time on an H200 on 2026-12-02, a run whose result file was not kept. A merged switch costs a
  copy and one small GEMM per Linear.
- The base weights of every Linear any served adapter touches are kept once, in (pinned) host memory.
  A switch restores the Linears the last adapter changed and merges the next one; no adapter (or
  scale 0) restores the base weights: the base model's output, bit for bit. Parameters are changed in
  place, never replaced, so compiled graphs see the same tensors and never recompile.
- Each served adapter is kept on the model's device, its scaling (alpha / rank) folded into its
  up-projection, so a switch reads no file.

`deinterleave_rope` (pipeline/dit.py) stores each self-attention head's query/key rows as (evens,
odds). An adapter's delta B @ A must land on the same rows, so the up-projections (lora_B) of every
self-attention to_q/to_k are permuted with the same order (`rope_halves_order`); lora_A reads the
block's input, which is not permuted, and cross-attention has no RoPE.

Keys are checked against the model before anything is merged: an adapter that silently does nothing
must fail at start-up instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.dit import HalvesRopeProcessor, rope_halves_order

LORA_FILE_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")  # diffusers', PEFT's
PEFT_CONFIG = "adapter_config.json"  # PEFT's save_pretrained writes lora_alpha and r here
KEY_PREFIXES = ("transformer.", "base_model.model.")  # diffusers' pipeline-level keys, PEFT's saved models
SHOWN_KEYS = 5  # mismatched keys named in an error; the count says how many more


class LoraMismatchError(ValueError):
    """An adapter whose keys or shapes do not fit the model: a configuration error, raised at start-up."""


def lora_file(path: str | Path) -> Path:
    """The adapter's .safetensors file: `path` itself, or the one adapter file in the folder `path`."""
    path = Path(path)
    if not path.is_dir():
        if not path.is_file():
            raise FileNotFoundError(f"LoRA adapter {path}: no such file or folder")
        return path
    for name in LORA_FILE_NAMES:
        if (path / name).is_file():
            return path / name
    candidates = sorted(path.glob("*.safetensors"))
    if len(candidates) != 1:
        raise FileNotFoundError(f"LoRA adapter folder {path}: expected one .safetensors file "
                                f"(or one of {', '.join(LORA_FILE_NAMES)}), found {[c.name for c in candidates]}")
    return candidates[0]


def load_lora_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], float]:
    """An adapter file or folder -> its LoRA weights keyed by the transformer's module names
    (`blocks.0.attn1.to_q.lora_A.weight`), whatever format it was saved in, and its scaling
    (lora_alpha / r from the file's metadata or the folder's adapter_config.json; 1 without either,
    as diffusers loads such files; the Wan/ComfyUI converter folds its alphas into the weights)."""
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    file = lora_file(path)
    try:
        state_dict, metadata = WanLoraLoaderMixin.lora_state_dict(str(file), return_lora_metadata=True)
    except Exception as error:  # the converters raise bare ValueErrors that do not say which file
        raise LoraMismatchError(f"LoRA adapter {file}: cannot read or convert it: {error}") from error
    config_file = file.parent / PEFT_CONFIG
    if not metadata and config_file.is_file():
        metadata = json.loads(config_file.read_text())
    return {_model_key(key): tensor for key, tensor in state_dict.items()}, _scaling(metadata or {}, file)


def _scaling(metadata: dict, file: Path) -> float:
    if metadata.get("rank_pattern") or metadata.get("alpha_pattern") or metadata.get("use_rslora") or metadata.get("use_dora"):
        raise LoraMismatchError(f"LoRA adapter {file}: per-module ranks or alphas, rsLoRA and DoRA are not supported")
    if "lora_alpha" not in metadata or "r" not in metadata:
        return 1.0
    return float(metadata["lora_alpha"]) / float(metadata["r"])


def _model_key(key: str) -> str:
    for prefix in KEY_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def mismatched_keys(transformer: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """The keys of `state_dict` that are not a lora_A/lora_B weight of a Linear of `transformer`, or whose shape does not fit it."""
    modules = dict(transformer.named_modules())
    mismatched = []
    for key, tensor in state_dict.items():
        module_name, _, tail = key.rpartition(".lora_")
        linear = modules.get(module_name)
        expected = None
        if isinstance(linear, torch.nn.Linear):
            expected = {"A.weight": (None, linear.in_features), "B.weight": (linear.out_features, None)}.get(tail)
        fits = expected is not None and tensor.ndim == len(expected) and all(
            want is None or want == got for want, got in zip(expected, tensor.shape))
        if not fits:
            mismatched.append(f"{key} {tuple(tensor.shape)}")
    return mismatched


def adapter_pairs(name: str, state_dict: dict[str, torch.Tensor], source: str | Path | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module name -> (lora_A [r, in], lora_B [out, r]); every A needs its B and the ranks must agree."""
    where = f"LoRA adapter {name!r} ({source or 'state dict'})"
    pairs = {}
    for key in state_dict:
        module_name, _, tail = key.rpartition(".lora_")
        if tail != "A.weight":
            continue
        down, up = state_dict[key], state_dict.get(f"{module_name}.lora_B.weight")
        if up is None or up.shape[1] != down.shape[0]:
            raise LoraMismatchError(f"{where}: {module_name} has lora_A of rank {down.shape[0]} but "
                                    f"{'no lora_B' if up is None else f'lora_B of rank {up.shape[1]}'}")
        pairs[module_name] = (down, up)
    orphans = {key.rpartition(".lora_")[0] for key in state_dict} - set(pairs)
    if orphans:
        raise LoraMismatchError(f"{where}: lora_B without lora_A for {', '.join(sorted(orphans)[:SHOWN_KEYS])}")
    return pairs


class ServedAdapters:
    """The adapters a replica serves, loaded once; `use` merges one (or none) into the weights for the next jobs.

    `adapters`: name -> (state dict keyed by module names, its scaling), as `load_lora_state_dict`
    gives; `sources` names each one's file in errors; `device` is where the model computes (the
    adapters are kept there). The transformer may be stock or rearranged, on any device.
    """

    def __init__(self, transformer: torch.nn.Module, adapters: dict[str, tuple[dict[str, torch.Tensor], float]],
                 sources: dict[str, str | Path] | None = None, device: torch.device | None = None):
        sources = sources or {}
        pairs = {}
        for name, (state_dict, _scaling) in adapters.items():
            if not state_dict:
                raise LoraMismatchError(f"LoRA adapter {name!r} ({sources.get(name, 'state dict')}) holds no weights")
            mismatched = mismatched_keys(transformer, state_dict)
            if mismatched:
                more = f" and {len(mismatched) - SHOWN_KEYS} more" if len(mismatched) > SHOWN_KEYS else ""
                raise LoraMismatchError(f"LoRA adapter {name!r} ({sources.get(name, 'state dict')}) does not match the model: "
                                        f"{len(mismatched)} of {len(state_dict)} keys fit no layer: "
                                        f"{', '.join(mismatched[:SHOWN_KEYS])}{more}")
            pairs[name] = adapter_pairs(name, state_dict, sources.get(name))
        self.transformer = transformer
        self.names = tuple(adapters)
        device = device or next(transformer.parameters()).device
        targets = sorted({module for adapter in pairs.values() for module in adapter})
        self.linears = [{module: transformer.get_submodule(module) for module in targets}]  # and CFG-parallel copies'
        pin = device.type == "cuda"  # pinned: a restore is an asynchronous copy; a CPU stage never touches CUDA
        self.base_weights = {module: _host_copy(linear.weight, pin) for module, linear in self.linears[0].items()}
        self.bank = {name: self._laid_out(adapter, adapters[name][1], device) for name, adapter in pairs.items()}
        self.merged: set[str] = set()  # the Linears whose weights now differ from the base
        self.active: tuple[str | None, float] = (None, 0.0)

    def _laid_out(self, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], scaling: float,
                  device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """On `device` in the weights' dtype, scaling folded into lora_B, query/key rows permuted as the model's."""
        laid_out = {}
        for module, (down, up) in pairs.items():
            dtype = self.base_weights[module].dtype
            up = up.to(device, torch.float32) * scaling
            laid_out[module] = (down.to(device, dtype), up[self._row_order(module).to(device)].to(dtype))
        return laid_out

    def _row_order(self, module: str) -> torch.Tensor:
        """The up-projection's row order in the model's layout (pipeline/dit.py's (evens, odds) for rearranged q/k)."""
        block, _, projection = module.rpartition(".")
        attention = self.transformer.get_submodule(block) if block else None
        if projection in ("to_q", "to_k") and isinstance(getattr(attention, "processor", None), HalvesRopeProcessor):
            return rope_halves_order(attention)
        return torch.arange(self.base_weights[module].shape[0])

    @torch.no_grad()
    def use(self, name: str | None, scale: float = 1.0) -> None:
        """Merge adapter `name` at `scale` into the weights (None or scale 0: the base weights); a no-op if it is already there."""
        if name is not None and name not in self.bank:
            raise KeyError(f"no LoRA adapter named {name!r} is served (served: {', '.join(self.names) or 'none'})")
        wanted = (None, 0.0) if name is None or scale == 0 else (name, float(scale))
        if wanted == self.active:
            return
        adapter = self.bank.get(wanted[0], {})
        for linears in self.linears:
            for module in self.merged | adapter.keys():
                weight = linears[module].weight
                weight.copy_(self.base_weights[module], non_blocking=True)
                if module in adapter:
                    _add_delta(weight, *adapter[module], wanted[1])
        self.merged = set(adapter)
        self.active = wanted

    def attach_copy(self, copy: torch.nn.Module) -> None:
        """Merge into `copy` too: a deep copy of the transformer (CFG-parallel's second GPU), made with the same adapter merged."""
        self.linears.append({module: copy.get_submodule(module) for module in self.linears[0]})


def _host_copy(weight: torch.Tensor, pin: bool) -> torch.Tensor:
    copy = weight.detach().to("cpu", copy=True)
    return copy.pin_memory() if pin else copy


def _add_delta(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float) -> None:
    """weight += scale * up @ down, computed where the adapter lives when the weight is in host memory (offload, stream)."""
    if weight.device == up.device or weight.device.type == "cuda":
        weight.addmm_(up.to(weight.device), down.to(weight.device), alpha=scale)
    else:
        weight.add_(torch.mm(up, down).to(weight.device), alpha=scale)

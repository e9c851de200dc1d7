"""LoRA adapters on the Wan DiT, including the rearranged one of pipeline/dit.py, switched per job.

Files are read with diffusers' own machinery: `WanLoraLoaderMixin.lora_state_dict` reads
diffusers/PEFT files and converts the original Wan / ComfyUI key formats. Serving them is ours
(`ServedAdapters`), built for compiled blocks:

- The transformer gets one PEFT LoRA adapter, the *slot*, of the largest rank served, on every Linear
  any served adapter touches. Its active-adapter list and scaling never change again, so compiled
  graphs never see a guard change.
- Each served adapter is kept on the slot's device at the slot's rank (zero-padded), its scaling
  (alpha / rank) folded into its up-projection. Choosing one for a job copies it into the slot in
  place and multiplies by the job's `lora_scale`; no adapter (or scale 0) zeroes the up-projections,
  which adds exact zeros: the base model's output, bit for bit. This is diffusers' LoRA hot-swap
  (in-place copies into rank-padded slots) without re-reading the file each time.

Two things follow from pipeline/dit.py:

- `deinterleave_rope` stores each self-attention head's query/key rows as (evens, odds). An
  adapter's delta B @ A must land on the same rows, so the up-projections (lora_B) of every
  self-attention to_q/to_k are permuted with the same order (`rope_halves_order`); lora_A reads the
  block's input, which is not permuted, and cross-attention has no RoPE.
- `GeluInEpilogue` computes the FFN's up-projection from the Linear's weight directly, which would
  skip an adapter on it: such a module goes back to diffusers' GELU (its unfused forward).

Keys are checked against the model before anything is injected: PEFT only warns about keys it
cannot place, and an adapter that silently does nothing must fail at start-up instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.diffusers_compat import restore_class
from pipeline.dit import GeluInEpilogue, HalvesRopeProcessor, rope_halves_order

LORA_FILE_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")  # diffusers', PEFT's
PEFT_CONFIG = "adapter_config.json"  # PEFT's save_pretrained writes lora_alpha and r here
KEY_PREFIXES = ("transformer.", "base_model.model.")  # diffusers' pipeline-level keys, PEFT's saved models
SHOWN_KEYS = 5  # mismatched keys named in an error; the count says how many more
SLOT = "served"  # the one PEFT adapter name the transformer carries


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
        linear = _base_linear(modules.get(module_name))
        expected = None
        if linear is not None:
            expected = {"A.weight": (None, linear.in_features), "B.weight": (linear.out_features, None)}.get(tail)
        fits = expected is not None and tensor.ndim == len(expected) and all(
            want is None or want == got for want, got in zip(expected, tensor.shape))
        if not fits:
            mismatched.append(f"{key} {tuple(tensor.shape)}")
    return mismatched


def _base_linear(module: torch.nn.Module | None) -> torch.nn.Linear | None:
    """The Linear that `module` is, or that a PEFT layer (the slot) wraps."""
    module = getattr(module, "base_layer", module)
    return module if isinstance(module, torch.nn.Linear) else None


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
    """The adapters a replica serves, loaded once; `use` picks one (or none) for the next forward passes.

    `adapters`: name -> (state dict keyed by module names, its scaling), as `load_lora_state_dict`
    gives; `sources` names each one's file in errors. The transformer may be stock or rearranged.
    """

    def __init__(self, transformer: torch.nn.Module, adapters: dict[str, tuple[dict[str, torch.Tensor], float]],
                 sources: dict[str, str | Path] | None = None):
        from peft import LoraConfig

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
        self.rank = max(down.shape[0] for adapter in pairs.values() for down, _ in adapter.values())
        targets = sorted({module for adapter in pairs.values() for module in adapter})
        # lora_alpha = r: the slot's own scaling is 1; each adapter's is folded into its up-projection.
        transformer.add_adapter(LoraConfig(r=self.rank, lora_alpha=self.rank, target_modules=targets, lora_dropout=0.0), SLOT)
        _unfuse_adapted_gelu(transformer)
        self.slots = {module: transformer.get_submodule(module) for module in targets}
        self.copies: list[dict[str, torch.nn.Module]] = []  # the same slots in copies of the transformer
        self.bank = {name: self._to_slot_layout(adapter, adapters[name][1]) for name, adapter in pairs.items()}
        self.active: tuple[str | None, float] | None = None
        self.use(None)

    def _to_slot_layout(self, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], scaling: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Zero-padded to the slot's rank, on its device and dtype, scaling folded in, query/key rows permuted."""
        laid_out = {}
        for module, (down, up) in pairs.items():
            slot = self.slots[module]
            slot_down, slot_up = slot.lora_A[SLOT].weight, slot.lora_B[SLOT].weight
            padded_down, padded_up = torch.zeros_like(slot_down), torch.zeros_like(slot_up)
            padded_down[: down.shape[0]] = down.to(padded_down)
            padded_up[:, : up.shape[1]] = up.to(padded_up) * scaling
            laid_out[module] = (padded_down, padded_up[self._row_order(module).to(padded_up.device)])
        return laid_out

    def _row_order(self, module: str) -> torch.Tensor:
        """The up-projection's row order in the model's layout (pipeline/dit.py's (evens, odds) for rearranged q/k)."""
        block, _, projection = module.rpartition(".")
        attention = self.transformer.get_submodule(block) if block else None
        if projection in ("to_q", "to_k") and isinstance(getattr(attention, "processor", None), HalvesRopeProcessor):
            return rope_halves_order(attention)
        return torch.arange(self.slots[module].out_features)

    @torch.no_grad()
    def use(self, name: str | None, scale: float = 1.0) -> None:
        """Copy adapter `name` at `scale` into the slot (None or scale 0: no adapter); a no-op if it is already there."""
        if name is not None and name not in self.bank:
            raise KeyError(f"no LoRA adapter named {name!r} is served (served: {', '.join(self.names) or 'none'})")
        wanted = (None, 0.0) if name is None or scale == 0 else (name, float(scale))
        if wanted == self.active:
            return
        adapter = self.bank.get(wanted[0], {})
        for slots in (self.slots, *self.copies):
            for module, slot in slots.items():
                slot_down, slot_up = slot.lora_A[SLOT].weight, slot.lora_B[SLOT].weight
                if module in adapter:
                    down, up = adapter[module]
                    slot_down.copy_(down)
                    slot_up.copy_(up * wanted[1])
                else:
                    slot_up.zero_()
        self.active = wanted

    def attach_copy(self, copy: torch.nn.Module) -> None:
        """Switch the slots of `copy`, a deep copy of the transformer (CFG-parallel's second GPU), along with its own."""
        self.copies.append({module: copy.get_submodule(module) for module in self.slots})

    def describe(self) -> dict:
        """For the cache key and /readyz: what the compiled graphs depend on, and what is served."""
        return {"names": list(self.names), "rank": self.rank, "modules": len(self.slots)}



def _unfuse_adapted_gelu(transformer: torch.nn.Module) -> None:
    """`GeluInEpilogue` reads `proj.weight` itself and would skip an adapter on `proj`: use diffusers' forward there."""
    for module in transformer.modules():
        if type(module) is GeluInEpilogue and hasattr(module.proj, "base_layer"):
            restore_class(module)

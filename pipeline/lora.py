"""LoRA adapters on the Wan DiT, including the rearranged one of pipeline/dit.py.

Adapters are loaded with diffusers' own machinery: `WanLoraLoaderMixin.lora_state_dict` reads
diffusers/PEFT files and converts the original Wan / ComfyUI key formats, and the transformer's
`load_lora_adapter` injects PEFT LoRA layers. Two things of ours sit on top:

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

from pathlib import Path

import torch

from pipeline.diffusers_compat import restore_class
from pipeline.dit import GeluInEpilogue, HalvesRopeProcessor, rope_halves_order

LORA_FILE_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")  # diffusers', PEFT's
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


def load_lora_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """An adapter file or folder -> its LoRA weights keyed by the transformer's module names
    (`blocks.0.attn1.to_q.lora_A.weight`), whatever format it was saved in."""
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    file = lora_file(path)
    try:
        state_dict = WanLoraLoaderMixin.lora_state_dict(str(file))
    except Exception as error:  # the converters raise bare ValueErrors that do not say which file
        raise LoraMismatchError(f"LoRA adapter {file}: cannot read or convert it: {error}") from error
    return {_model_key(key): tensor for key, tensor in state_dict.items()}


def _model_key(key: str) -> str:
    for prefix in KEY_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def mismatched_keys(transformer: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """The keys of `state_dict` that name no Linear of `transformer` or whose shape does not fit it."""
    modules = dict(transformer.named_modules())
    mismatched = []
    for key, tensor in state_dict.items():
        module_name, _, tail = key.rpartition(".lora_")
        linear = _base_linear(modules.get(module_name))
        expected = None
        if linear is not None:
            expected = {"A.weight": (None, linear.in_features), "B.weight": (linear.out_features, None),
                        "B.bias": (linear.out_features,)}.get(tail)
        fits = expected is not None and tensor.ndim == len(expected) and all(
            want is None or want == got for want, got in zip(expected, tensor.shape))
        if not fits:
            mismatched.append(f"{key} {tuple(tensor.shape)}")
    return mismatched


def _base_linear(module: torch.nn.Module | None) -> torch.nn.Linear | None:
    """The Linear that `module` is, or that a PEFT layer (an earlier adapter) wraps."""
    module = getattr(module, "base_layer", module)
    return module if isinstance(module, torch.nn.Linear) else None


def add_adapter(transformer: torch.nn.Module, name: str, state_dict: dict[str, torch.Tensor],
                source: str | Path | None = None) -> None:
    """Load adapter `name` into `transformer` (stock or rearranged by pipeline/dit.py); all adapters are
    off until `use_adapter` picks one.

    `source` (the file it came from) is named in errors. Several adapters may be loaded; each keeps
    its own weights, and switching between them reloads nothing.
    """
    if not state_dict:
        raise LoraMismatchError(f"LoRA adapter {name!r} ({source or 'state dict'}) holds no weights")
    mismatched = mismatched_keys(transformer, state_dict)
    if mismatched:
        more = f" and {len(mismatched) - SHOWN_KEYS} more" if len(mismatched) > SHOWN_KEYS else ""
        raise LoraMismatchError(f"LoRA adapter {name!r} ({source or 'state dict'}) does not match the model: "
                                f"{len(mismatched)} of {len(state_dict)} keys fit no layer: "
                                f"{', '.join(mismatched[:SHOWN_KEYS])}{more}")
    # prefix=None: the keys are already the transformer's own module names.
    transformer.load_lora_adapter(dict(state_dict), adapter_name=name, prefix=None)
    _permute_rope_rows(transformer, name)
    _unfuse_adapted_gelu(transformer)
    transformer.disable_lora()  # load_lora_adapter activates it; each job chooses with `use_adapter`


def load_adapter(transformer: torch.nn.Module, name: str, path: str | Path) -> None:
    """`add_adapter` of the adapter file or folder at `path`."""
    add_adapter(transformer, name, load_lora_state_dict(path), source=path)


def use_adapter(transformer: torch.nn.Module, name: str | None, scale: float = 1.0) -> None:
    """Make adapter `name` at `scale` the only active one for the next forward passes; None: none at all."""
    if name is None:
        if getattr(transformer, "peft_config", None):
            transformer.disable_lora()
        return
    if name not in getattr(transformer, "peft_config", {}):
        raise KeyError(f"no LoRA adapter named {name!r} is loaded (loaded: {sorted(getattr(transformer, 'peft_config', {}))})")
    transformer.enable_lora()
    transformer.set_adapters([name], [scale])


def _permute_rope_rows(transformer: torch.nn.Module, name: str) -> None:
    """Put adapter `name`'s query/key up-projection rows in the (evens, odds) order of `deinterleave_rope`."""
    for block in transformer.blocks:
        attention = block.attn1
        if not isinstance(attention.processor, HalvesRopeProcessor):
            continue  # stock diffusers layout: rows already in the adapter's order
        order = rope_halves_order(attention)
        for projection in (attention.to_q, attention.to_k):
            up = getattr(projection, "lora_B", {})
            if name not in up:
                continue
            if name in getattr(projection, "lora_magnitude_vector", {}):
                raise LoraMismatchError(f"LoRA adapter {name!r}: DoRA adapters are not supported")
            up = up[name]
            up.weight.data = up.weight.data[order.to(up.weight.device)]
            if up.bias is not None:
                up.bias.data = up.bias.data[order.to(up.bias.device)]


def _unfuse_adapted_gelu(transformer: torch.nn.Module) -> None:
    """`GeluInEpilogue` reads `proj.weight` itself and would skip an adapter on `proj`: use diffusers' forward there."""
    for module in transformer.modules():
        if type(module) is GeluInEpilogue and hasattr(module.proj, "base_layer"):
            restore_class(module)

"""torch's private API, in one place: what pipeline/ and bench/ use that torch does not promise to keep.

Written for torch>=2.5,<2.15 (pyproject.toml's pin); tests/test_compat.py checks each use against the
installed torch, so an upgrade that drops or changes one fails there, by name.

- `torch._addmm_activation`: the one way to reach cuBLASLt's GELU epilogue from Python
  (`pipeline.dit.linear_gelu_tanh`).
- `torch._dynamo.config`'s recompile limit (`recompile_limit`, `cache_size_limit` in older releases):
  how many shapes one compiled region may meet before it silently falls back to eager.
- `torch._inductor.config`: process-wide Inductor settings, for compiles whose `mode` rules out
  `torch.compile(options=...)` (bench/profile_gpu.py).
"""

from __future__ import annotations

import torch

SUPPORTED_VERSIONS = "torch>=2.5,<2.15"


def addmm_gelu(bias: torch.Tensor, x: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """gelu(bias + x @ weight_t) as one op: on CUDA the tanh GELU in cuBLASLt's epilogue, elsewhere the erf GELU."""
    return torch._addmm_activation(bias, x, weight_t, use_gelu=True)


def raise_recompile_limit(limit: int) -> None:
    """Let each compiled region meet at least `limit` shapes before Dynamo gives up on it (process-wide)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), limit))


def set_inductor_options(options: dict[str, object]) -> dict[str, object]:
    """Set process-wide Inductor options; returns the values they replace, to set back afterwards."""
    import torch._inductor.config as inductor_config

    replaced = {name: getattr(inductor_config, name) for name in options}
    for name, value in options.items():
        setattr(inductor_config, name, value)
    return replaced

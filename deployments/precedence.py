"""Parameter precedence, the seed's "command line beats the UI", generalised to four levels:

1. operator pins (YAML `pins`, `wan-t2v serve` flags)   -- highest
2. the request's values
3. operator defaults (YAML `defaults`)
4. built-in defaults (the seed's, in GenerationParams)  -- lowest

Every field where a pin replaced a value the request asked for is reported with both values.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError, model_validator

from deployments.protocol import OptionalParams
from pipeline.params import GenerationParams


class ParamOverrides(OptionalParams):
    """A partial parameter set (pins or defaults); each value is validated like a request's."""

    @model_validator(mode="after")
    def _values_in_range(self) -> ParamOverrides:
        # Reuse the one parameter model so pins and defaults obey the same ranges as requests.
        checked = GenerationParams(prompt="-", **self.given())
        for name in self.given():
            setattr(self, name, getattr(checked, name))
        return self

    def given(self) -> dict[str, Any]:
        return {name: value for name, value in self.model_dump().items() if value is not None}


def resolve(
    requested: dict[str, Any], pins: ParamOverrides, defaults: ParamOverrides
) -> tuple[GenerationParams, list[dict[str, Any]]]:
    """Merge the four levels; returns the effective parameters and the overridden fields.

    Raises pydantic's ValidationError for a bad requested value, naming the field.
    """
    merged = {**defaults.given(), **requested, **pins.given()}
    params = GenerationParams(**merged)
    # Validate what the request asked for on its own too, so a pinned field still rejects garbage.
    GenerationParams(**{**defaults.given(), **requested})
    overridden = []
    for name, pinned in pins.given().items():
        if name in requested and _normalised(name, requested[name]) != getattr(params, name):
            overridden.append({"field": name, "requested": requested[name], "effective": pinned})
    return params, overridden


def _normalised(name: str, value: Any) -> Any:
    """Compare a requested value with the effective one in the model's own spelling (832x480 == 832*480)."""
    try:
        return getattr(GenerationParams(prompt="-", **{name: value}), name)
    except ValidationError:
        return value


__all__ = ["ParamOverrides", "resolve", "ValidationError"]

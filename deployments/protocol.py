"""Request and response models of the HTTP API (the shape of OpenAI's /v1/videos, plus our fields).

Serving logic lives in `gateway.py`; this module only says what goes over the wire.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from pipeline.params import ALLOWED, SIZES, GenerationParams, flag_help

JobStatus = Literal["queued", "in_progress", "completed", "failed", "cancelled"]
TERMINAL_STATUSES = ("completed", "failed", "cancelled")
PARAM_FIELDS = tuple(GenerationParams.model_fields)
MAX_SECONDS = 7  # 16*7+1 = 113 frames; 8 s would be 129, past the 121-frame limit

ALLOWED_REQUEST = {
    **ALLOWED,
    "seconds": f"an integer from 1 to {MAX_SECONDS}; sets frame_num = 16*seconds + 1",
    "model": "the served model's id (see GET /v1/models); informational",
}


# The generation parameters other than the prompt, each optional: None means "not given". Derived from
# GenerationParams so that a new parameter reaches the API, pins and defaults without another list.
OptionalParams = create_model(
    "OptionalParams",
    __config__=ConfigDict(extra="forbid"),
    **{name: (GenerationParams.model_fields[name].annotation | None, None) for name in PARAM_FIELDS if name != "prompt"},
)


class VideoCreateRequest(OptionalParams):
    """POST /v1/videos body: the parameter model plus OpenAI's `model` and `seconds`.

    Only the fields a client sent count as "requested"; the gateway fills the rest by precedence.
    """

    prompt: str
    model: str | None = None
    seconds: int | None = Field(default=None, ge=1, le=MAX_SECONDS)

    @field_validator("seconds", mode="before")
    @classmethod
    def _seconds_as_text(cls, value: Any) -> Any:
        # OpenAI's SDK sends seconds as a string ("4").
        return value.strip() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _seconds_or_frames(self) -> VideoCreateRequest:
        if self.seconds is not None and self.frame_num is not None:
            raise ValueError("give either seconds or frame_num, not both")
        return self

    def requested_params(self) -> dict[str, Any]:
        """The generation parameters this request set explicitly (None means "not given")."""
        values = {name: getattr(self, name) for name in PARAM_FIELDS if getattr(self, name) is not None}
        if self.seconds is not None:
            values["frame_num"] = 16 * self.seconds + 1
        return values


def create_request_schema() -> dict[str, Any]:
    """POST /v1/videos' body (JSON or form) as the OpenAPI document shows it: the request with GenerationParams' ranges.

    The request model leaves ranges to GenerationParams (pins and defaults share them), so they are
    copied in here: clients and the fuzzer see the real limits.
    """
    schema = VideoCreateRequest.model_json_schema()
    ranges = GenerationParams.model_json_schema()["properties"]
    schema["properties"].update({name: {**ranges[name], "description": flag_help(name)} for name in PARAM_FIELDS})
    schema["properties"]["size"]["enum"] = list(SIZES)  # "832x480" is accepted too
    schema["properties"]["prompt"]["pattern"] = r"\S"  # not blank
    return schema


class Override(BaseModel):
    field: str
    requested: Any
    effective: Any


class JobError(BaseModel):
    code: str
    message: str


class VideoJob(BaseModel):
    """The job object: OpenAI's video fields plus step-level progress and effective parameters."""

    id: str
    object: Literal["video"] = "video"
    status: JobStatus
    progress: int = 0
    phase: str = "queued"
    step: int = 0
    total_steps: int = 0
    queue_position: int | None = None
    created_at: int
    started_at: int | None = None
    completed_at: int | None = None
    expires_at: int | None = None  # OpenAI's field; always null: videos stay until DELETE
    model: str
    demo_model: bool
    prompt: str
    size: str  # OpenAI spelling, "832x480"
    seconds: str
    parameters: dict[str, Any]
    overridden: list[Override] = []
    seed: int
    text_encoder: str | None = None  # "cpu" or "gpu": the deployment that encoded the prompt
    memory_policy: str | None = None
    timings: dict[str, float] = {}
    peak_gpu_memory_bytes: int | None = None
    attempts: int = 0
    request_id: str | None = None
    error: JobError | None = None


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VideoJob]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class FieldError(BaseModel):
    field: str
    value: Any = None
    message: str


class ErrorBody(BaseModel):
    """Every 4xx/5xx body: a machine code, a human message, and per-field details where relevant."""

    code: str
    message: str
    fields: list[FieldError] = []


class AdapterCard(BaseModel):
    """A served LoRA adapter in GET /v1/models: a request selects it with `lora`."""

    id: str
    object: Literal["model"] = "model"
    owned_by: str = "wan-t2v-serve"
    kind: Literal["lora"] = "lora"
    parent: str  # the base model it adapts


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    owned_by: str = "wan-t2v-serve"
    source: str
    layout: str
    demo_model: bool

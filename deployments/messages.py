"""What passes between the deployments, typed: bind options, the job's work, the stage calls' messages.

Kept free of torch and diffusers: the gateway imports it, and must start light.
"""

from __future__ import annotations

from typing import Any, Literal

import ray
from pydantic import BaseModel, ConfigDict, Field

from pipeline.params import GenerationParams


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class TextEncoderOptions(BaseModel):
    """A text encoder's YAML options (`cpu_text_encoder`, `gpu_text_encoder`), also its bind options."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=1.0, ge=0)
    # Ray gives a replica as many torch threads as whole CPUs it reserved (one for num_cpus 1); umT5-XXL
    # on the CPU wants more (threads against seconds: bench/results/encoder-threads-h200-2026-12-02.json).
    torch_threads: int | None = Field(default=None, ge=1)
    # gpu_text_encoder only: the share of a GPU each replica reserves. 1 keeps a GPU to the encoder; a
    # fraction shares one with the generator (whose gpus_per_replica then leaves room: 0.75 + 0.25),
    # umT5-XXL taking about 11 GB of it in bf16.
    num_gpus: float = Field(default=1.0, gt=0, le=1)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    cache_size: int = Field(default=256, ge=0)
    max_batch_size: int = Field(default=8, ge=1)
    batch_wait_timeout_s: float = Field(default=0.01, ge=0)


class TeamSettings(Message):
    """generator.parallel, resolved: the layout of one replica's processes and what each rank reserves."""

    cfg: int
    ulysses: int
    ring: int
    num_cpus: float
    num_gpus: float  # 1 per rank on GPUs, 0 on CPUs


class GeneratorSettings(Message):
    """VideoGenerator's bind options, resolved by the app builder from the YAML."""

    device: Literal["cuda", "cpu"]
    memory_policy: Literal["resident", "offload", "stream"]
    vae_dtype: str
    compile_for: dict[str, Any] | None = None  # operator defaults/pins whose shape is warmed; None = eager
    cfg_parallel: bool = False
    step_cache: dict[str, Any] | None = None
    attention: str = "auto"
    fault_injection: dict[str, Any] | None = None
    compile_cache_dir: str | None = None
    loras: dict[str, str] = {}  # served LoRA adapters: name -> file or folder
    team: TeamSettings | None = None  # one video on several processes (deployments/team.py)


class GatewaySettings(Message):
    """The Gateway's bind options: the model it serves, the operator's pins, defaults and limits, the store."""

    model: dict[str, Any]
    loras: list[str] = []  # the served LoRA adapters' names
    pins: dict[str, Any]
    defaults: dict[str, Any]
    limits: dict[str, int]
    output_dir: str
    max_pending_jobs: int
    lease_seconds: float
    max_attempts: int
    concurrent_jobs: int  # the most generator replicas the cluster may run: the runner loops per gateway
    memory_policy: str
    honor_request_offload: bool
    stalled_job_s: float
    security: Any  # deployments.security.SecurityPolicy (its keys stay out of reprs)


class JobWork(Message):
    """What the runner needs of a job beyond what users see; stored with the job."""

    params: GenerationParams
    negative_prompt: str
    memory_policy: Literal["resident", "offload", "stream"] = "resident"
    submitted_at: float


class EncodedText(Message):
    """TextEncoder.encode's answer: real-token embeddings [n_tokens, dim] (a CPU tensor) and the time taken."""

    embeddings: Any
    seconds: float


class GenerateJob(Message):
    """VideoGenerator.generate's request: the encodes travel as references, possibly still being computed."""

    params: GenerationParams
    memory_policy: Literal["resident", "offload", "stream"]  # the job's plan: the generator does not decide it again
    context: ray.ObjectRef  # -> EncodedText of the prompt
    negative_context: ray.ObjectRef  # -> EncodedText of the negative prompt


class ProgressEvent(Message):
    type: Literal["progress"] = "progress"
    phase: str
    step: int
    total: int


class GenerationOutput(Message):
    """The stream's last item: the video and what it took."""

    type: Literal["result"] = "result"
    mp4: bytes
    thumbnail: bytes
    frames: int
    timings: dict[str, float]
    peak_gpu_bytes: int | None
    memory_policy: str
    device: str

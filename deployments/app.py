"""The application builder: one validated args model -> the three-stage Ray Serve graph.

`serve run serve_config.yaml` calls `build` with the YAML's `args`. Unknown keys are an error naming
the key (Ray itself would silently drop them).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import ray
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray import serve
from ray.serve.config import BackpressureConfig

from deployments.admission import RETRY_AFTER_S
from deployments.gateway import Gateway
from deployments.generator import VideoGenerator
from deployments.messages import GatewaySettings, GeneratorSettings, TeamSettings, TextEncoderOptions
from deployments.precedence import ParamOverrides, resolve
from deployments.security import SecurityPolicy, load_api_keys
from deployments.text_encoder import TextEncoder
from pipeline.attention import AttentionKernel
from pipeline.compile_cache import STEP_CACHE_NOT_COMPILABLE
from pipeline.loading import attention_heads, resolve_model_source
from pipeline.memory import MemoryPolicy
from pipeline.parallel import ParallelLayout
from pipeline.params import ADAPTER_NAME

log = logging.getLogger("wan_t2v.app")

DEMO_BANNER = (
    "\n" + "!" * 78 + "\n!! SERVING THE BUILT-IN DEMO MODEL: tiny random weights, NOT Wan2.1. Videos are noise.\n"
    "!! Put a checkpoint at ./Wan2.1-T2V-1.3B or set WAN_CKPT_DIR / args.model for real output.\n" + "!" * 78
)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StepCacheOptions(Strict):
    """Opt-in step caching (diffusers hooks): faster, approximate; `options` go to the hook's config."""

    kind: Literal["first_block", "taylorseer"]
    options: dict[str, Any] = {}


class FaultInjection(Strict):
    """Testing and drills only, off unless set: the replica's 1st, (1+n)th, ... job raises
    torch.OutOfMemoryError in the denoising loop's step callback at `out_of_memory_at_step`, so the
    job fails with error code `out_of_memory` and the jobs in between show the replica recovered."""

    out_of_memory_at_step: int = Field(ge=1)
    every_nth_job: int = Field(default=1, ge=1)


class ParallelOptions(Strict):
    """generator.parallel: one video's DiT on several GPUs of one replica (pipeline/parallel.py).

    The replica holds cfg × ulysses × ring GPUs, one process each; gpus_per_replica is that product.
    """

    cfg: Literal[1, 2] = 1  # 2: the guidance branches on two halves of the GPUs
    ulysses: int = Field(default=1, ge=1)  # all-to-all over heads: must divide the model's heads (12 for 1.3B)
    ring: int = Field(default=1, ge=1)  # keys and values gathered over this many token blocks: any degree
    # How Ray places the replica's GPUs (its placement group): PACK fills one host where it can and
    # spills to others; STRICT_PACK one host only; SPREAD / STRICT_SPREAD across hosts.
    placement_strategy: Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"

    @property
    def layout(self) -> ParallelLayout:
        return ParallelLayout(self.cfg, self.ulysses, self.ring)


class GeneratorOptions(Strict):
    num_replicas: int = Field(default=1, ge=1)
    autoscaling_config: dict[str, Any] | None = None
    gpus_per_replica: Literal["auto"] | Annotated[float, Field(ge=0)] = "auto"
    # Half a CPU: the generator's work is on the GPU, and the default app must fit a 2-core machine.
    num_cpus: float = Field(default=0.5, ge=0)
    memory_policy: MemoryPolicy = MemoryPolicy.RESIDENT
    honor_request_offload: bool = False
    vae_dtype: Literal["float32", "bfloat16"] = "float32"
    # auto: FlashAttention-3 on a Hopper GPU where installed (the `gpu` extra), else PyTorch SDPA;
    # flash3: FA3 or a start-up error. Exact attention either way (its gain: the README's table).
    attention: AttentionKernel = "auto"
    # Regional torch.compile of the DiT blocks, warmed at replica start for the default size and
    # frame count: faster steps for a longer first start (bench/RESULTS.md; the start's phases: /readyz).
    compile: bool = False
    # Where compiled code persists between starts, in a folder per torch/diffusers/model/GPU/shape key
    # (pipeline/compile_cache.py): only a machine's first start compiles. Safe to delete.
    # Default: <output_dir>/compile-cache.
    compile_cache_dir: str | None = None
    # CFG-parallel: each replica holds two GPUs and runs the unconditional branch on the second.
    cfg_parallel: bool = False
    step_cache: StepCacheOptions | None = None
    # One video on several GPUs: e.g. {cfg: 2, ulysses: 4} on 8. Replicas then hold that many GPUs each.
    parallel: ParallelOptions | None = None
    fault_injection: FaultInjection | None = None

    @field_validator("autoscaling_config")
    @classmethod
    def _known_autoscaling_keys(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """Ray drops unknown autoscaling keys silently; a typo here must fail by name."""
        if value is None:
            return value
        from ray.serve.config import AutoscalingConfig

        unknown = sorted(set(value) - set(AutoscalingConfig.model_fields))
        if unknown:
            raise ValueError(f"unknown autoscaling_config key(s) {', '.join(unknown)}; known: {', '.join(sorted(AutoscalingConfig.model_fields))}")
        AutoscalingConfig(**value)
        return value

    @model_validator(mode="after")
    def _two_gpus_for_cfg_parallel(self) -> GeneratorOptions:
        if self.cfg_parallel and self.gpus_per_replica != 2:
            raise ValueError("cfg_parallel needs gpus_per_replica: 2 (one GPU per guidance branch)")
        if self.cfg_parallel and self.memory_policy is not MemoryPolicy.RESIDENT:
            raise ValueError("cfg_parallel keeps both DiT copies resident: use memory_policy resident")
        if self.step_cache is not None and self.compile:
            raise ValueError(f"generator: {STEP_CACHE_NOT_COMPILABLE}")
        return self

    @model_validator(mode="after")
    def _one_gpu_per_rank(self) -> GeneratorOptions:
        if self.parallel is None:
            return self
        world = self.parallel.layout.world_size
        if self.gpus_per_replica not in ("auto", 0, world):
            raise ValueError(f"generator.parallel runs {world} processes (cfg {self.parallel.cfg} × ulysses {self.parallel.ulysses} × "
                             f"ring {self.parallel.ring}), one GPU each: gpus_per_replica must be {world}, 'auto', or 0 for CPUs")
        for clash, why in ((self.cfg_parallel, "cfg_parallel: use parallel.cfg: 2 instead"),
                           (self.memory_policy is not MemoryPolicy.RESIDENT, "memory_policy other than resident"),
                           (self.honor_request_offload, "honor_request_offload (every rank keeps its DiT resident)"),
                           (self.step_cache is not None, "step_cache")):
            if clash:
                raise ValueError(f"generator.parallel does not combine with {why}")
        return self


class GatewayOptions(Strict):
    num_replicas: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=0.5, ge=0)
    # A job request is well under 10 KiB; anything past this is a 413 before it is parsed.
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    # Browser origins (https://host:port) allowed to call the API from other sites; empty: no CORS.
    cors_origins: list[str] = []
    # Ray Serve's own admission limits per gateway replica (submits are cheap, but SSE streams and
    # /sync calls hold a slot for a whole video). Past both, Serve's proxy answers 429 with
    # Retry-After, as the gateway does past max_pending_jobs, instead of Serve's default 503.
    max_ongoing_requests: int = Field(default=1000, ge=1)
    max_queued_requests: int = Field(default=1000, ge=1)
    # /readyz answers 503 once a running job has reported no progress for this long: longer than any
    # denoising step, prompt encode or decode should take, even with the stream policy or on a CPU.
    stalled_job_s: float = Field(default=300.0, gt=0)


class AuthOptions(Strict):
    """Bearer API keys on /v1: the YAML names an environment variable, never holds a key."""

    api_keys_env: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")


class OutputLimits(Strict):
    max_frame_num: int = Field(default=121, ge=5, le=121)
    max_sample_steps: int = Field(default=100, ge=1, le=100)


class AppArgs(Strict):
    model: str = "auto"
    allow_demo: bool = False
    model_cache_dir: str | None = None
    cpu_text_encoder: TextEncoderOptions | None = TextEncoderOptions()
    gpu_text_encoder: TextEncoderOptions | None = None
    generator: GeneratorOptions = GeneratorOptions()
    gateway: GatewayOptions = GatewayOptions()
    auth: AuthOptions | None = None
    pins: ParamOverrides = ParamOverrides()
    defaults: ParamOverrides = ParamOverrides()
    limits: OutputLimits = OutputLimits()
    output_dir: str = "outputs"
    # LoRA adapters served, name -> an adapter file or folder on this server (diffusers/PEFT or the
    # original Wan/ComfyUI format). Requests choose one by name (`lora`); never a path.
    loras: dict[str, str] = {}
    max_pending_jobs: int = Field(default=64, ge=1)
    # A running job's lease: a gateway replica that is alive but stuck loses its job to another after
    # this long (a dead replica's jobs are re-queued at once).
    lease_seconds: float = Field(default=30.0, gt=0)
    # Runs of one job when a model replica dies under it; then the job ends `failed`.
    max_attempts: int = Field(default=3, ge=1)

    @model_validator(mode="after")
    def _encoders(self) -> AppArgs:
        if self.cpu_text_encoder is None and self.gpu_text_encoder is None:
            raise ValueError("deploy at least one of cpu_text_encoder and gpu_text_encoder")
        if self.cpu_text_encoder is not None and "num_gpus" in self.cpu_text_encoder.model_fields_set:
            raise ValueError("cpu_text_encoder.num_gpus: the CPU encoder reserves no GPU; set it on gpu_text_encoder")
        return self

    @field_validator("loras")
    @classmethod
    def _adapter_files(cls, value: dict[str, str]) -> dict[str, str]:
        """Names a request can give, files that exist: checked here, before any replica starts."""
        from pipeline.lora import lora_file

        resolved = {}
        for name, path in value.items():
            if not re.match(ADAPTER_NAME, name):
                raise ValueError(f"loras: {name!r} is not an adapter name (letters, digits, '.', '_', '-'; at most 64)")
            try:
                lora_file(Path(path).expanduser())
            except FileNotFoundError as error:
                raise ValueError(f"loras.{name}: {error}") from None
            resolved[name] = str(Path(path).expanduser().resolve())
        return resolved

    @model_validator(mode="after")
    def _pinned_adapter_is_served(self) -> AppArgs:
        for where, overrides in (("pins", self.pins), ("defaults", self.defaults)):
            if overrides.lora and overrides.lora not in self.loras:
                raise ValueError(f"{where}.lora: {overrides.lora!r} is not in loras (served: {', '.join(self.loras) or 'none'})")
        return self


def cluster_gpus() -> float:
    return ray.cluster_resources().get("GPU", 0.0) if ray.is_initialized() else 0.0


def generator_gpus(option: Literal["auto"] | float) -> float:
    """`auto`: one GPU per replica where the cluster has GPUs, else the CPU, loudly."""
    if option != "auto":
        return float(option)
    if cluster_gpus() >= 1:
        return 1.0
    log.warning("No GPU in the Ray cluster: the VideoGenerator runs on the CPU (very slow for real weights)")
    return 0.0


def gateway_security(args: AppArgs) -> SecurityPolicy:
    """Keys are read here, where `serve run` builds the app, and travel to the gateway in its (unlogged)
    init arguments: a deployment's runtime_env would show them in `serve status` and the dashboard,
    and a missing variable fails the build instead of a replica, or worse, leaving the API open."""
    keys = load_api_keys(args.auth.api_keys_env) if args.auth else ()
    if keys:
        log.info("API keys required on /v1 (%d from $%s)", len(keys), args.auth.api_keys_env)
    return SecurityPolicy(api_keys=keys, max_body_bytes=args.gateway.max_body_bytes, cors_origins=tuple(args.gateway.cors_origins))


def build(args: AppArgs) -> serve.Application:
    if isinstance(args, dict):  # called directly rather than by Ray's typed builder
        args = AppArgs(**args)
    security = gateway_security(args)  # first: a missing key variable fails before any model loads
    source = resolve_model_source(args.model, allow_demo=args.allow_demo, cache_dir=args.model_cache_dir)
    if source.is_demo:
        log.warning(DEMO_BANNER)
        print(DEMO_BANNER, flush=True)
    else:
        log.info("serving %s from %s (%s)", source.model_id, source.folder, source.origin)

    # Encoded at each encoder replica's start: the negative prompt of every job that sends none.
    default_negative = resolve({"prompt": "-"}, args.pins, args.defaults)[0].effective_negative_prompt
    encoders = {}
    for placement, options in (("cpu", args.cpu_text_encoder), ("gpu", args.gpu_text_encoder)):
        if options is None:
            continue
        gpus = options.num_gpus if placement == "gpu" else 0.0
        encoders[placement] = TextEncoder.options(
            name=f"TextEncoder{placement.upper()}",
            num_replicas=options.num_replicas,
            ray_actor_options={"num_cpus": options.num_cpus, "num_gpus": gpus},
        ).bind(source, placement, options, (default_negative,))

    gen = args.generator
    output_dir = Path(args.output_dir).expanduser().resolve()
    # A pinned offload_model is the operator's word on the replica's memory policy.
    policy = gen.memory_policy
    if args.pins.offload_model is not None and policy is not MemoryPolicy.STREAM:
        policy = MemoryPolicy.from_offload_flag(args.pins.offload_model)
    gpus = generator_gpus(gen.gpus_per_replica)
    scaling = {"autoscaling_config": gen.autoscaling_config} if gen.autoscaling_config else {"num_replicas": gen.num_replicas}
    team = None
    if gen.parallel is not None:
        heads = attention_heads(source)
        if heads is not None:  # else each replica checks at its start
            gen.parallel.layout.check_heads(heads)
        gpus = 1.0 if gpus > 0 else 0.0  # per rank: the replica is rank 0, in its placement group's first bundle
        team = TeamSettings(cfg=gen.parallel.cfg, ulysses=gen.parallel.ulysses, ring=gen.parallel.ring,
                            num_cpus=gen.num_cpus, num_gpus=gpus)
        bundle = {"CPU": gen.num_cpus, **({"GPU": gpus} if gpus else {})}
        scaling.update(placement_group_bundles=[bundle] * gen.parallel.layout.world_size,
                       placement_group_strategy=gen.parallel.placement_strategy)
    generator = VideoGenerator.options(
        ray_actor_options={"num_cpus": gen.num_cpus, "num_gpus": gpus}, **scaling
    ).bind(source, GeneratorSettings(
        device="cuda" if gpus > 0 else "cpu",
        memory_policy=policy.value,
        vae_dtype=gen.vae_dtype,
        compile_for={**args.defaults.given(), **args.pins.given()} if gen.compile else None,
        cfg_parallel=gen.cfg_parallel,
        step_cache=gen.step_cache.model_dump() if gen.step_cache else None,
        attention=gen.attention,
        fault_injection=gen.fault_injection.model_dump() if gen.fault_injection else None,
        compile_cache_dir=str(Path(gen.compile_cache_dir).expanduser().resolve() if gen.compile_cache_dir else output_dir / "compile-cache"),
        loras=args.loras,
        team=team,
    ))

    max_generators = (gen.autoscaling_config or {}).get("max_replicas", gen.num_replicas)
    settings = GatewaySettings(
        model=source.describe(),
        loras=list(args.loras),
        pins=args.pins.given(),
        defaults=args.defaults.given(),
        limits=args.limits.model_dump(),
        output_dir=str(output_dir),
        max_pending_jobs=args.max_pending_jobs,
        lease_seconds=args.lease_seconds,
        max_attempts=args.max_attempts,
        concurrent_jobs=max_generators,
        memory_policy=policy.value,
        honor_request_offload=gen.honor_request_offload,
        stalled_job_s=args.gateway.stalled_job_s,
        security=security,
    )
    return Gateway.options(
        num_replicas=args.gateway.num_replicas,
        ray_actor_options={"num_cpus": args.gateway.num_cpus},
        max_ongoing_requests=args.gateway.max_ongoing_requests,
        max_queued_requests=args.gateway.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=RETRY_AFTER_S),
    ).bind(encoders.get("cpu"), encoders.get("gpu"), generator, settings)

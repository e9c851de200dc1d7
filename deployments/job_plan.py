"""One decision per job: a request, the operator's pins and defaults and what is deployed become a
typed plan: the parameters, the text encoder, the memory policy, and what a pin overrode.

The gateway plans each job once, stores the plan's parameters with it, and tells the generator the
memory policy; `/v1/config` publishes the rules (`Planner.rules`), so the page and the CLI show
what the server will decide.
"""

from __future__ import annotations

from typing import Any, Literal

from deployments.messages import Message
from deployments.precedence import ParamOverrides, resolve
from pipeline.params import GenerationParams

Encoder = Literal["cpu", "gpu"]
Policy = Literal["resident", "offload", "stream"]


class JobPlan(Message):
    params: GenerationParams  # resolved, seed drawn; t5_cpu and offload_model say what was decided
    overridden: list[dict[str, Any]]
    text_encoder: Encoder
    memory_policy: Policy


class Planner:
    def __init__(self, pins: ParamOverrides, defaults: ParamOverrides, encoders: list[Encoder],
                 replica_policy: Policy, honor_request_offload: bool):
        self.pins, self.defaults = pins, defaults
        self.encoders = encoders  # the deployed text encoders
        self.replica_policy = replica_policy  # the generator replicas' policy, a pinned offload_model applied
        self.honor_request_offload = honor_request_offload

    def plan(self, requested: dict[str, Any]) -> JobPlan:
        """Raises pydantic's ValidationError for a bad value, naming the field."""
        params, overridden = resolve(requested, self.pins, self.defaults)
        encoder = self.text_encoder(params.t5_cpu)
        policy = self.memory_policy(params.offload_model)
        params = params.with_seed().model_copy(update={"t5_cpu": encoder == "cpu", "offload_model": policy != "resident"})
        return JobPlan(params=params, overridden=overridden, text_encoder=encoder, memory_policy=policy)

    def text_encoder(self, t5_cpu: bool | None) -> Encoder:
        """t5_cpu picks the encoder (the CPU one unless it says false); if that one isn't deployed, the deployed one."""
        wanted = "cpu" if t5_cpu in (None, True) else "gpu"
        return wanted if wanted in self.encoders else self.encoders[0]

    def memory_policy(self, offload_model: bool | None) -> Policy:
        """A stream replica keeps its policy (its hooks are installed at load); otherwise offload_model,
        where the operator lets requests choose and the request (or a pin) says, else the replica's."""
        if self.replica_policy == "stream" or offload_model is None or not (self.honor_request_offload or self.pins.offload_model is not None):
            return self.replica_policy
        return "offload" if offload_model else "resident"

    def rules(self) -> dict[str, Any]:
        """How jobs are planned, for `/v1/config`."""
        return {"text_encoders": sorted(self.encoders), "memory_policy": self.replica_policy,
                "honor_request_offload": self.honor_request_offload}

"""Admission: a request body becomes a queued job, or a 4xx naming the field.

Parse (JSON or form) -> validate -> the job's plan (`deployments.job_plan`: pins and defaults, text
encoder, memory policy) -> this server's limits -> a durable job row.
"""

import json
import time
import uuid

from fastapi import Request
from pydantic import ValidationError

from deployments.errors import ApiError, field_error
from deployments.job_board import JobBoard
from deployments.jobs import QueueFull, new_job_id
from deployments.messages import GatewaySettings, JobWork
from deployments.job_plan import JobPlan, Planner
from deployments.precedence import ParamOverrides
from deployments.protocol import ALLOWED_REQUEST, VideoCreateRequest, VideoJob
from pipeline.params import GenerationParams, field_errors

RETRY_AFTER_S = 10  # the Retry-After of every 429: the gateway's full queue and Serve's backpressure


def _not_a_json_number(name: str):
    """Python's json reads NaN and Infinity; JSON has neither, and no parameter accepts them."""
    raise ValueError(f"{name} is not a JSON number")


async def request_fields(request: Request) -> dict:
    """JSON, or multipart/urlencoded form (OpenAI's SDK sends form data), validated alike.

    An empty form field means "not given" (the SDK sends None as ""); an uploaded file, such as
    OpenAI's input_reference, is kept so that validation rejects it by name.
    """
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        try:
            form = await request.form()
        except Exception as error:  # noqa: BLE001 - a malformed form is the client's error
            raise field_error(400, "invalid_body", "body", f"unreadable form data ({error})") from None
        fields: dict = {}
        for key, value in form.multi_items():
            if key in fields:  # a form's list: one parameter given twice
                raise field_error(422, "invalid_parameters", key, "given more than once; allowed: one value")
            fields[key] = value
        return {key: value for key, value in fields.items() if value != ""}
    raw = await request.body()
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_not_a_json_number)
        json.dumps(body, ensure_ascii=False).encode("utf-8")  # a lone "\ud800" escape is no text either
    except UnicodeError:
        raise field_error(400, "invalid_body", "body", "not UTF-8 text") from None
    except ValueError as error:  # JSONDecodeError, or NaN / Infinity
        raise field_error(400, "invalid_json", "body", f"malformed JSON ({error})") from None
    if not isinstance(body, dict):
        raise field_error(422, "invalid_request", "body", "must be a JSON object of parameters")
    return body


def invalid(error: ValidationError) -> ApiError:
    fields = field_errors(error, ALLOWED_REQUEST)
    return ApiError(422, "invalid_parameters", "; ".join(item["message"] for item in fields), fields)


class Admission:
    def __init__(self, settings: GatewaySettings, encoders: list[str], board: JobBoard):
        self.settings = settings
        self.model = settings.model
        self.limits = settings.limits
        self.planner = Planner(ParamOverrides(**settings.pins), ParamOverrides(**settings.defaults), encoders,
                               settings.memory_policy, settings.honor_request_offload)
        self.board = board

    async def submit(self, request: Request) -> dict:
        """The queued job for this request (raises ApiError: 4xx for bad input, 429 for a full queue)."""
        body = await request_fields(request)
        try:
            create = VideoCreateRequest(**body)
        except ValidationError as error:
            raise invalid(error) from None
        except TypeError as error:
            raise field_error(422, "invalid_request", "body", str(error)) from None
        try:
            plan = self.planner.plan(create.requested_params())
        except ValidationError as error:
            raise invalid(error) from None
        self.check_limits(plan.params, create.seconds)
        self.check_adapter(plan.params)
        job, work = self.new_job(plan, request.headers.get("x-request-id"))
        try:
            return await self.board.call(self.board.store.create, job, work.model_dump(mode="json"), self.settings.max_pending_jobs)
        except QueueFull as error:
            raise ApiError(429, "queue_full", f"{error}; retry later", headers={"Retry-After": str(RETRY_AFTER_S)}) from None

    def new_job(self, plan: JobPlan, request_id: str | None) -> tuple[dict, JobWork]:
        """The job row users see, and the work the runner needs (not shown)."""
        now = time.time()
        params = plan.params
        job = VideoJob(
            id=new_job_id(),
            status="queued",
            created_at=int(now),
            model=self.model["id"],
            demo_model=self.model["demo_model"],
            prompt=params.prompt,
            size=params.size.replace("*", "x"),
            seconds=f"{(params.frame_num - 1) / 16:g}",
            parameters=params.model_dump(),
            overridden=plan.overridden,
            seed=params.seed,
            text_encoder=plan.text_encoder,
            memory_policy=plan.memory_policy,
            total_steps=params.sample_steps,
            request_id=request_id or uuid.uuid4().hex,
        ).model_dump()
        work = JobWork(params=params, negative_prompt=params.effective_negative_prompt, memory_policy=plan.memory_policy, submitted_at=now)
        return job, work

    def check_adapter(self, params: GenerationParams) -> None:
        """A request names an adapter; which ones exist is this server's `loras:` registry."""
        if params.lora and params.lora not in self.settings.loras:
            served = ", ".join(self.settings.loras) or "none are served here"
            raise field_error(422, "invalid_parameters", "lora", f"no adapter named {params.lora!r}; allowed: empty for none, "
                              f"or one of the served adapters ({served}; GET /v1/models)", params.lora)

    def check_limits(self, params: GenerationParams, seconds: int | None) -> None:
        """The operator's limits, named as the request put it: OpenAI's `seconds` stands for frame_num."""
        if seconds is not None and params.frame_num > self.limits["max_frame_num"]:
            most = (self.limits["max_frame_num"] - 1) // 16
            allowed = f"at most {most} s" if most >= 1 else f"none (give frame_num, at most {self.limits['max_frame_num']})"
            raise field_error(422, "invalid_parameters", "seconds", f"{seconds} s is {params.frame_num} frames, above this server's "
                              f"limit of {self.limits['max_frame_num']}; allowed: {allowed}", seconds)
        for name, limit in (("frame_num", self.limits["max_frame_num"]), ("sample_steps", self.limits["max_sample_steps"])):
            value = getattr(params, name)
            if value > limit:
                raise field_error(422, "invalid_parameters", name, f"{value} is above this server's limit; allowed: at most {limit}", value)

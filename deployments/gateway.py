"""Gateway deployment: the FastAPI ingress that maps each request onto the two model stages.

Request path, in one direction: validate -> precedence -> job store -> runner -> text encoder
handle, and at once the generator handle with references to the encodes (streamed progress) ->
files + job store. Jobs are durable rows, so the asynchronous API, the synchronous endpoint, the
web page and the CLI all share one machinery.
"""


import asyncio
import functools
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.errors import ApiError, error_response, field_error
from deployments.jobs import ACTIVE, JOB_ID, JobStore, QueueFull, new_job_id
from deployments.metrics import GatewayMetrics
from deployments.precedence import ParamOverrides, resolve
from deployments.protocol import (
    ALLOWED_REQUEST,
    TERMINAL_STATUSES,
    ModelCard,
    VideoCreateRequest,
    VideoJob,
    VideoList,
    create_request_schema,
)
from deployments.security import OPEN_PATHS, RequestGuard
from pipeline.params import SIZES, field_errors

log = logging.getLogger("ray.serve")

WEB_DIR = Path(__file__).parent / "web"
SERVE_NAMESPACE = "serve"  # where Serve names its replica actors (a replica's own namespace is the driver's)
RECOVER_EVERY_S = 5.0  # how often a gateway looks for jobs left running by a dead replica
SSE_KEEPALIVE_S = 15.0
RETRY_AFTER_S = 10  # the Retry-After of every 429: the gateway's full queue and Serve's backpressure
PROGRESS_SHARE = {"text_encode": 2, "denoise": 93, "decode": 4, "write": 1}  # % of the bar per phase


class BearerDescribedAPI(FastAPI):
    """FastAPI whose document declares the Bearer scheme, so /docs' Authorize button sends the API key.

    A description only: RequestGuard alone checks keys. The paths it leaves open say they need none.
    """

    def openapi(self) -> dict:
        if self.openapi_schema is None:
            schema = super().openapi()
            schema.setdefault("components", {})["securitySchemes"] = {"bearer": {
                "type": "http", "scheme": "bearer", "description": "an API key, where the server sets auth.api_keys_env"}}
            schema["security"] = [{"bearer": []}]
            for path in OPEN_PATHS & schema["paths"].keys():
                for operation in schema["paths"][path].values():
                    operation["security"] = []
        return self.openapi_schema


app = BearerDescribedAPI(title="wan-t2v-serve", version="0.1.0", description="Wan2.1 T2V-1.3B text-to-video")
# API keys, body limit, CORS: the replica's policy, found through Serve's replica context at request time.
app.add_middleware(RequestGuard, policy=lambda: serve.get_replica_context().servable_object.security)
# The submit routes read their body by hand (JSON or form); the schema still tells clients and fuzzers its shape.
CREATE_BODY = {"requestBody": {"required": True, "content": {
    media_type: {"schema": create_request_schema()} for media_type in ("application/json", "application/x-www-form-urlencoded", "multipart/form-data")
}}}


@app.exception_handler(ApiError)
async def _api_error(_: Request, error: ApiError):
    return error.response()


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, error: StarletteHTTPException):
    """Starlette's own refusals (no such route, wrong method) in the API's error shape too."""
    return error_response(error.status_code, f"http_{error.status_code}", str(error.detail), headers=error.headers)


@app.exception_handler(RequestValidationError)
async def _query_error(_: Request, error: RequestValidationError):
    fields = []
    for item in error.errors():
        name = ".".join(str(part) for part in item["loc"][1:]) or str(item["loc"][0])
        fields.append({"field": name, "value": None, "message": f"{name}: {item['msg']}"})
    return error_response(422, "invalid_request", "; ".join(f["message"] for f in fields), fields)


def progress_percent(phase: str, step: int, total: int) -> int:
    """The bar moves with real steps: denoising owns most of it, the other phases their slices."""
    done = 0
    for name, share in PROGRESS_SHARE.items():
        if name == phase:
            return min(100, int(done + share * (step / total if total else 0)))
        done += share
    return 0


def classify_error(error: Exception) -> tuple[str, str]:
    """A job error code and a message a user can act on."""
    text = f"{type(error).__name__}: {error}"
    if "OutOfMemoryError" in text or "out of memory" in text.lower():
        return "out_of_memory", "the GPU ran out of memory; use memory_policy 'stream' or a smaller size / frame_num"
    if any(name in text for name in ("ActorDiedError", "ActorUnavailableError", "RayActorError", "DeploymentUnavailableError", "ActorDied")):
        return "stage_unavailable", f"a model replica died while running this job ({type(error).__name__})"
    return "generation_error", text[:500]


def replica_alive(owner: str) -> bool:
    """Whether the gateway replica named in a lease owner ("<actor name>/<runner>") still exists.

    Serve replicas are named actors that Ray never restarts, so a name that no longer resolves
    means the replica is gone for good and its jobs can run again without waiting out the lease.
    All gateways sharing an output_dir must therefore live in one Ray cluster.
    """
    try:
        ray.get_actor(owner.rsplit("/", 1)[0], namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    except Exception:  # noqa: BLE001 - unsure (e.g. GCS unreachable): leave it to the lease
        log.exception("checking lease owner %s failed", owner)
    return True


def tag_job_calls(request_id: str) -> None:
    """Give the running task the job's request id, as Serve's proxy does for an HTTP request.

    The runner works outside any request, so without this the encoder and generator calls would get
    fresh ids. Serve passes the id from its request context along with every handle call, and its
    log formatter writes it on every line logged within the call, in all three replicas. Serve has
    no public setter; `_set_request_context` is the one its own proxy path uses.
    """
    serve.context._set_request_context(request_id=request_id)


def not_found(video_id: str) -> ApiError:
    return field_error(404, "not_found", "video_id", f"no video {video_id[:80]!r}; ids look like video_<24 hex digits>", video_id[:200])


def _rounded(timings: dict[str, float]) -> dict[str, float]:
    return {name: round(seconds, 4) for name, seconds in timings.items()}


def _not_a_json_number(name: str):
    """Python's json reads NaN and Infinity; JSON has neither, and no parameter accepts them."""
    raise ValueError(f"{name} is not a JSON number")


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


if WEB_DIR.is_dir():
    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")


@serve.deployment  # admission limits and backpressure: app.build, from GatewayOptions
@serve.ingress(app)
class Gateway:
    def __init__(self, cpu_encoder, gpu_encoder, generator, settings: dict):
        self.encoders = {name: handle for name, handle in (("cpu", cpu_encoder), ("gpu", gpu_encoder)) if handle is not None}
        self.generator = generator
        self.settings = settings
        self.security = settings["security"]  # what RequestGuard applies
        self.model = settings["model"]
        self.pins = ParamOverrides(**settings["pins"])
        self.defaults = ParamOverrides(**settings["defaults"])
        self.limits = settings["limits"]
        self.lease_seconds = settings["lease_seconds"]
        self.max_attempts = settings["max_attempts"]
        self.store = JobStore(settings["output_dir"])
        # Every store call runs on this one thread, never on the event loop: SQLite blocks (on the disk,
        # on another replica's write lock) and the store's lock may be held by the recovery thread.
        self._store_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="job-store")
        self.owner = ray.get_runtime_context().get_actor_name()  # what replica_alive looks up
        self.wakeup = asyncio.Event()
        self.tick = asyncio.Event()  # set (and replaced) whenever this replica changes a job
        self.running: dict[str, Any] = {}  # job id -> generator stream, to cancel at once
        self.metrics = GatewayMetrics()
        loop = asyncio.get_event_loop()
        self.tasks = [loop.create_task(self._recover()), *(loop.create_task(self._runner(i)) for i in range(settings["concurrent_jobs"]))]

    # -- health and metadata ------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def index(self) -> Response:
        page = WEB_DIR / "index.html"
        if not page.exists():
            return JSONResponse({"service": "wan-t2v-serve", "docs": "/docs"})
        return FileResponse(page, media_type="text/html")

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self) -> JSONResponse:
        stages = {f"text_encoder_{name}": handle for name, handle in self.encoders.items()}
        stages["video_generator"] = self.generator
        report, ready = {}, True
        for name, handle in stages.items():
            try:
                report[name] = await asyncio.wait_for(handle.describe.remote(), timeout=5)
            except asyncio.TimeoutError:
                if name == "video_generator" and (await self._db(self.store.list, 1, None, "in_progress"))[0]:
                    # One request at a time per generator replica: the probe waits behind a video.
                    report[name] = {"busy": True, "note": "generating; the probe is queued behind the job"}
                    continue
                report[name] = {"error": "TimeoutError: no answer within 5 s"}
                ready = False
            except Exception as error:  # noqa: BLE001 - any failure means "not ready"
                report[name] = {"error": f"{type(error).__name__}: {error}"}
                ready = False
        return JSONResponse(status_code=200 if ready else 503, content={"ready": ready, "stages": report})

    @app.get("/v1/models")
    async def models(self) -> dict:
        card = ModelCard(id=self.model["id"], source=self.model["source"], layout=self.model["layout"], demo_model=self.model["demo_model"])
        return {"object": "list", "data": [card.model_dump()]}

    @app.get("/v1/config")
    async def config(self) -> dict:
        """What the web page needs: sizes, pins (locked controls), defaults, limits, demo flag."""
        return {
            "model": self.model,
            "sizes": list(SIZES),
            "pins": self.pins.given(),
            "defaults": self.defaults.given(),
            "limits": self.limits,
            "text_encoders": sorted(self.encoders),
            "memory_policy": self.settings["memory_policy"],
            "honor_request_offload": self.settings["honor_request_offload"],
        }

    # -- submit -------------------------------------------------------------------------------

    @app.post("/v1/videos", status_code=202, response_model=VideoJob, openapi_extra=CREATE_BODY)
    async def create_video(self, request: Request) -> JSONResponse:
        job = await self._submit(request)
        return JSONResponse(status_code=202, content=job)

    @app.post("/v1/videos/sync", response_class=Response, openapi_extra=CREATE_BODY)
    async def create_video_sync(self, request: Request) -> Response:
        """The same job machinery, waited for: returns the MP4, with the job as ASCII JSON in a header."""
        job = await self._submit(request)
        try:
            job = await self._wait_terminal(job["id"])
        except asyncio.CancelledError:
            await asyncio.shield(self._cancel(job["id"]))  # the client went away: free the generator within a step
            raise
        if job["status"] != "completed":
            error = job.get("error") or {"code": job["status"], "message": f"job {job['status']}"}
            status = 503 if error["code"] in ("stage_unavailable",) else 500 if job["status"] == "failed" else 409
            raise ApiError(status, error["code"], error["message"])
        header = {key: job[key] for key in ("id", "model", "demo_model", "parameters", "overridden", "seed", "timings", "text_encoder", "memory_policy")}
        return FileResponse(
            self.store.files(job["id"])["video"],
            media_type="video/mp4",
            headers={"X-Video-Job": json.dumps(header, ensure_ascii=True, separators=(",", ":"))},
        )

    async def _submit(self, request: Request) -> dict:
        body = await self._request_fields(request)
        try:
            create = VideoCreateRequest(**body)
        except ValidationError as error:
            raise self._invalid(error) from None
        except TypeError as error:
            raise field_error(422, "invalid_request", "body", str(error)) from None
        requested = create.requested_params()
        try:
            params, overridden = resolve(requested, self.pins, self.defaults)
        except ValidationError as error:
            raise self._invalid(error) from None
        self._check_limits(params, create.seconds)
        params = params.with_seed()
        encoder = self._pick_encoder(params.t5_cpu)
        offload = self._effective_offload(params.offload_model)
        params = params.model_copy(update={"t5_cpu": encoder == "cpu", "offload_model": offload})
        now = time.time()
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
            overridden=overridden,
            seed=params.seed,
            text_encoder=encoder,
            memory_policy=self.settings["memory_policy"] if offload is None else ("offload" if offload else "resident"),
            total_steps=params.sample_steps,
            request_id=request.headers.get("x-request-id") or uuid.uuid4().hex,
        ).model_dump()
        work = {"params": params.model_dump(), "negative_prompt": params.effective_negative_prompt, "submitted_at": now}
        try:
            job = await self._db(self.store.create, job, work, self.settings["max_pending_jobs"])
        except QueueFull as error:
            self.metrics.job("rejected")
            raise ApiError(429, "queue_full", f"{error}; retry later", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        log.info("job %s queued (request %s)", job["id"], job["request_id"])
        self.metrics.job("queued")
        self.wakeup.set()
        return job

    async def _request_fields(self, request: Request) -> dict:
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
            return {key: value for key, value in form.items() if value != ""}
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

    def _invalid(self, error: ValidationError) -> ApiError:
        fields = field_errors(error, ALLOWED_REQUEST)
        return ApiError(422, "invalid_parameters", "; ".join(item["message"] for item in fields), fields)

    def _check_limits(self, params, seconds: int | None) -> None:
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

    def _pick_encoder(self, t5_cpu: bool | None) -> str:
        """The request's t5_cpu picks the encoder; if that one isn't deployed, the deployed one serves."""
        wanted = "cpu" if t5_cpu in (None, True) else "gpu"
        return wanted if wanted in self.encoders else next(iter(self.encoders))

    def _effective_offload(self, requested: bool | None) -> bool | None:
        if self.pins.offload_model is not None:
            return self.pins.offload_model
        if self.settings["honor_request_offload"] and requested is not None:
            return requested
        return self.settings["memory_policy"] != "resident"

    # -- read, cancel, delete -----------------------------------------------------------------

    async def _db(self, method, *args, **kwargs):
        """One JobStore call, on the store's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._store_thread, functools.partial(method, *args, **kwargs))

    async def _job(self, job_id: str) -> dict:
        job = await self._db(self.store.get, job_id) if JOB_ID.match(job_id) else None  # only a well-formed id reaches the store
        if job is None:
            raise not_found(job_id)
        return job

    @app.get("/v1/videos/{video_id}", response_model=VideoJob)
    async def retrieve(self, video_id: str) -> dict:
        return await self._job(video_id)

    @app.get("/v1/videos", response_model=VideoList)
    async def list_videos(
        self,
        limit: int = Query(20, ge=1, le=100),
        after: str | None = None,
        status: str | None = Query(None, pattern="^(queued|in_progress|completed|failed|cancelled)$"),
        order: str = Query("desc", pattern="^(asc|desc)$"),
    ) -> dict:
        try:
            jobs, has_more = await self._db(self.store.list, limit, after, status, order)
        except KeyError:
            raise field_error(422, "invalid_request", "after", f"no video {after[:80]!r}", after[:200]) from None
        return {
            "object": "list",
            "data": jobs,
            "has_more": has_more,
            "first_id": jobs[0]["id"] if jobs else None,
            "last_id": jobs[-1]["id"] if jobs else None,
        }

    @app.get("/v1/videos/{video_id}/content")
    async def content(self, video_id: str, variant: str = Query("video", pattern="^(video|thumbnail)$")) -> Response:
        """The MP4 (with Range support) or a JPEG of its first frame, once the job is completed."""
        job = await self._job(video_id)
        if job["status"] != "completed":
            message = f"video {video_id} is {job['status']} ({job['progress']}%); content exists once it is completed"
            raise ApiError(409, "not_ready", message, [{"field": "status", "value": job["status"], "message": message}])
        path = self.store.files(video_id)["thumbnail" if variant == "thumbnail" else "video"]
        if not path.exists():
            raise ApiError(404, "file_missing", f"video {video_id} is completed but its {variant} file is gone from the output folder")
        media_type = "image/jpeg" if variant == "thumbnail" else "video/mp4"
        return FileResponse(path, media_type=media_type, filename=f"{video_id}{path.suffix}")

    @app.post("/v1/videos/{video_id}/cancel", response_model=VideoJob)
    async def cancel_video(self, video_id: str) -> dict:
        """Stops a queued or running job and returns it; a job that has already ended is a 409, left as it is.

        The store decides, in one transaction with the change, so a job finishing at this moment is
        never deleted, unlike a status look followed by DELETE.
        """
        await self._job(video_id)  # a 404 naming video_id for an unknown or malformed id
        outcome = await self._cancel(video_id)
        if outcome is None:
            raise not_found(video_id)  # deleted since the look
        job, cancelled = outcome
        if not cancelled:
            raise field_error(409, "already_finished", "video_id", f"{video_id} is already {job['status']}; nothing to cancel", video_id)
        return job

    @app.delete("/v1/videos/{video_id}")
    async def delete(self, video_id: str) -> dict:
        """Cancels a queued or running job (returning it); deletes a finished one and its files.

        OpenAI's clients delete finished videos with it. To stop a job, POST .../cancel: between
        a client's look and its DELETE the job may finish, and DELETE would then delete the video.
        """
        outcome = await self._cancel(video_id) if (await self._job(video_id))["status"] in ACTIVE else None
        if outcome is not None:
            return outcome[0]
        await self._db(self.store.delete, video_id)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    async def _cancel(self, job_id: str) -> tuple[dict, bool] | None:
        """The store's answer: the job and whether this call cancelled it; None for no such job."""
        outcome = await self._db(self.store.cancel, job_id)
        if outcome is not None and outcome[1]:
            self.metrics.job("cancelled")
            stream = self.running.get(job_id)
            if stream is not None:
                stream.cancel()  # this replica runs it: stop the generator now, not at the next step
            self._notify()
        return outcome

    # -- live progress ------------------------------------------------------------------------

    @app.get("/v1/videos/{video_id}/events")
    async def events(self, video_id: str) -> StreamingResponse:
        """Server-Sent Events: the current state first, then one event per step and phase change.

        A reconnecting client gets the current state, then what changes after it; the stream ends
        with a `done` event carrying the terminal job.
        """
        seq = await self._db(self.store.last_event_seq, video_id)  # before reading the state: no change falls between
        job = await self._job(video_id)

        async def stream(seq: int):
            yield _sse("state", job)
            if job["status"] in TERMINAL_STATUSES:
                yield _sse("done", job)
                return
            quiet_since = time.monotonic()
            while True:
                for seq, update in await self._db(self.store.events_after, video_id, seq):
                    quiet_since = time.monotonic()
                    yield _sse("progress" if update["status"] == "in_progress" else "status", update)
                    if update["status"] in TERMINAL_STATUSES:
                        yield _sse("done", update)
                        return
                if await self._db(self.store.get, video_id) is None:
                    yield _sse("done", {**job, "status": "cancelled", "phase": "deleted"})
                    return
                if time.monotonic() - quiet_since > SSE_KEEPALIVE_S:
                    quiet_since = time.monotonic()
                    yield ": keepalive\n\n"  # a comment line: keeps proxies from timing out a long step
                await self._changed_or_timeout(1.0)

        return StreamingResponse(stream(seq), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _changed_or_timeout(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.tick.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass  # another replica may have moved the job: poll the store anyway

    def _notify(self) -> None:
        """Wake every waiter; a fresh event makes the next wait block again (no lock to hold)."""
        self.tick.set()
        self.tick = asyncio.Event()

    async def _wait_terminal(self, job_id: str) -> dict:
        while True:
            job = await self._db(self.store.get, job_id)
            if job is None or job["status"] in TERMINAL_STATUSES:
                return job or {"id": job_id, "status": "cancelled", "error": {"code": "deleted", "message": "job deleted"}}
            await self._changed_or_timeout(1.0)

    # -- running jobs -------------------------------------------------------------------------

    async def _recover(self) -> None:
        """Requeue jobs whose runner's replica died (a crash, a restart), at start and then now and then."""
        while True:
            try:
                # Not on the store's thread: looking up owners waits on Ray's GCS.
                requeued = await asyncio.to_thread(self.store.requeue_orphans, replica_alive)
                self.metrics.pending.set(await self._db(self.store.count, "queued"))  # also while every runner is busy
            except Exception:  # noqa: BLE001 - a locked database must not end recovery
                log.exception("looking for orphaned jobs failed")
                requeued = []
            if requeued:
                log.warning("queued again %d job(s) left running by a replica that is gone: %s", len(requeued), ", ".join(requeued))
                self.wakeup.set()
                self._notify()
            await asyncio.sleep(RECOVER_EVERY_S)

    async def _runner(self, index: int) -> None:
        owner = f"{self.owner}/{index}"
        while True:
            try:
                claimed = await self._db(self.store.claim, owner, self.lease_seconds, self.settings["concurrent_jobs"])
                self.metrics.pending.set(await self._db(self.store.count, "queued"))
            except Exception:  # noqa: BLE001 - a locked database must not kill the runner
                log.exception("claiming a job failed")
                claimed = None
            if claimed is None:
                self.wakeup.clear()
                try:
                    await asyncio.wait_for(self.wakeup.wait(), timeout=1.0)
                except asyncio.TimeoutError:
                    pass
                continue
            job, work = claimed
            self._notify()
            if job["attempts"] > self.max_attempts:
                await self._progress(job["id"], owner, status="failed", phase="failed", completed_at=int(time.time()),
                                     error={"code": "attempts_exhausted", "message": f"gave up after {self.max_attempts} attempts"})
                continue
            await asyncio.create_task(self._run(job, work, owner))  # a task of its own: the job's request id stays with it

    async def _progress(self, job_id: str, owner: str, **fields: Any) -> bool:
        """Record a change of a job this runner holds; False when it is no longer ours (cancelled, deleted)."""
        changed = await self._db(self.store.update, job_id, owner, **fields) is not None
        if changed and "status" in fields:
            self.metrics.job("retried" if fields["status"] == "queued" else fields["status"])
        self._notify()
        return changed

    async def _run(self, job: dict, work: dict, owner: str) -> None:
        job_id = job["id"]
        tag_job_calls(job["request_id"])
        renewal = asyncio.get_running_loop().create_task(self._renew(job_id, owner))
        started = time.time()
        timings = {"queue": started - work["submitted_at"]}
        try:
            if not await self._progress(job_id, owner, phase="text_encode"):
                return
            # The generator gets references to the two encodes, not their results, and starts at once:
            # step 1's unconditional pass needs only the negative prompt (nearly always cached) and
            # runs while the prompt is still encoding. Serve's documented way to hand a call's result
            # on unresolved is `_to_object_ref`. The gateway never awaits these references: that would
            # unpickle the embeddings (torch tensors) here, on Ray's core-worker I/O thread, where with
            # torch 2.11 it deadlocked the whole process on the GIL (tests/test_gateway_stall.py).
            # The encode times come back with the generator's result.
            encoder = self.encoders[job["text_encoder"]]
            prompt = await encoder.encode.remote(job["prompt"])._to_object_ref()
            negative = await encoder.encode.remote(work["negative_prompt"])._to_object_ref()
            stream = self.generator.options(stream=True).generate.remote(
                {"params": work["params"], "context": prompt, "negative_context": negative}
            )
            self.running[job_id] = stream
            result = None
            async for event in stream:
                if event["type"] == "result":
                    result = event
                    continue
                step = event["step"] if event["phase"] == "denoise" else job["total_steps"]
                if not await self._progress(job_id, owner, phase=event["phase"], step=step, progress=progress_percent(event["phase"], event["step"], event["total"])):
                    stream.cancel()  # cancelled or deleted elsewhere
                    return
            timings.update(result["timings"])
            await self._complete(job_id, owner, result, timings)
            log.info("job %s completed in %.1fs (request %s)", job_id, time.time() - started, job["request_id"])
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - every failure ends in the job, never in a lost job
            await self._fail_or_retry(job, owner, error)
        finally:
            self.running.pop(job_id, None)
            renewal.cancel()

    async def _complete(self, job_id: str, owner: str, result: dict, timings: dict[str, float]) -> None:
        """Files first, then the row: a job is never "completed" without its whole video on disk."""
        current = await self._db(self.store.get, job_id)
        if current is None or current["status"] != "in_progress":
            return
        final = {"status": "completed", "phase": "completed", "progress": 100, "step": current["total_steps"],
                 "completed_at": int(time.time()), "timings": _rounded(timings),
                 "memory_policy": result["memory_policy"], "peak_gpu_memory_bytes": result["peak_gpu_bytes"]}
        await asyncio.to_thread(self.store.write_result, {**current, **final}, result["mp4"], result["thumbnail"])
        if await self._progress(job_id, owner, **final):
            self.metrics.completed(timings, result["peak_gpu_bytes"])
        else:
            latest = await self._db(self.store.get, job_id)
            if latest is None or latest["status"] == "cancelled":
                await asyncio.to_thread(self.store.delete_files, job_id)  # cancelled while the files were written

    async def _fail_or_retry(self, job: dict, owner: str, error: Exception) -> None:
        code, message = classify_error(error)
        current = await self._db(self.store.get, job["id"])
        if current is None or current["status"] != "in_progress":
            return  # cancelled or deleted: the stream's error is the cancellation itself
        if code == "stage_unavailable" and job["attempts"] < self.max_attempts:
            log.warning("job %s attempt %d failed (%s); queued again", job["id"], job["attempts"], message)
            await self._progress(job["id"], owner, status="queued", phase="queued", step=0, progress=0)
            return
        if code == "stage_unavailable":
            message += f"; gave up after {job['attempts']} of max_attempts = {self.max_attempts}"
        log.error("job %s failed: %s (request %s)", job["id"], message, job["request_id"])
        await self._progress(job["id"], owner, status="failed", phase="failed", completed_at=int(time.time()), error={"code": code, "message": message})

    async def _renew(self, job_id: str, owner: str) -> None:
        """Keep the lease while the job runs; if it is gone (cancelled elsewhere), stop the stream."""
        while True:
            await asyncio.sleep(max(self.lease_seconds / 3, 0.2))
            if not await self._db(self.store.renew, job_id, owner, self.lease_seconds):
                stream = self.running.get(job_id)
                if stream is not None:
                    stream.cancel()
                return

"""Gateway deployment: the FastAPI ingress, thin routes over three parts.

Request path, in one direction: `deployments.admission` (parse, validate, pins and defaults,
limits) -> the job store (`deployments.jobs`, reached through `deployments.job_board`) ->
`deployments.job_runner` (the text encoder, then the generator, progress, files). Jobs are durable
rows, so the asynchronous API, the synchronous endpoint, the web page and the CLI share one machinery.
"""


import asyncio
import json
import logging
import time
from pathlib import Path

import ray
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.admission import Admission
from deployments.errors import ApiError, error_response, field_error
from deployments.job_board import JobBoard
from deployments.job_runner import JobRunner
from deployments.jobs import ACTIVE, JobStore
from deployments.messages import GatewaySettings
from deployments.metrics import GatewayMetrics
from deployments.protocol import TERMINAL_STATUSES, AdapterCard, ModelCard, VideoJob, VideoList, create_request_schema
from deployments.security import OPEN_PATHS, RequestGuard
from pipeline.params import SIZES, parameter_table

log = logging.getLogger("ray.serve")

WEB_DIR = Path(__file__).parent / "web"
SSE_KEEPALIVE_S = 15.0


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


def not_found(video_id: str) -> ApiError:
    return field_error(404, "not_found", "video_id", f"no video {video_id[:80]!r}; ids look like video_<24 hex digits>", video_id[:200])


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


if WEB_DIR.is_dir():
    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")


@serve.deployment  # admission limits and backpressure: app.build, from GatewayOptions
@serve.ingress(app)
class Gateway:
    def __init__(self, cpu_encoder, gpu_encoder, generator, settings: GatewaySettings):
        encoders = {name: handle for name, handle in (("cpu", cpu_encoder), ("gpu", gpu_encoder)) if handle is not None}
        self.generator = generator
        self.settings = settings
        self.security = settings.security  # what RequestGuard applies
        self.model = settings.model
        self.board = JobBoard(JobStore(settings.output_dir))
        self.store = self.board.store
        self.metrics = GatewayMetrics()
        self.admission = Admission(settings, list(encoders), self.board)
        self.runner = JobRunner(self.board, encoders, generator, self.metrics, ray.get_runtime_context().get_actor_name(),
                                settings.lease_seconds, settings.max_attempts, settings.concurrent_jobs)
        self.tasks = self.runner.start()

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
        stages = {f"text_encoder_{name}": handle for name, handle in self.runner.encoders.items()}
        stages["video_generator"] = self.generator
        report, ready = {}, True
        for name, handle in stages.items():
            try:
                report[name] = await asyncio.wait_for(handle.describe.remote(), timeout=5)
            except asyncio.TimeoutError:
                if name == "video_generator" and (busy := await self._generator_busy()) is not None:
                    report[name], ready = busy, ready and "error" not in busy
                    continue
                report[name] = {"error": "TimeoutError: no answer within 5 s"}
                ready = False
            except Exception as error:  # noqa: BLE001 - any failure means "not ready"
                report[name] = {"error": f"{type(error).__name__}: {error}"}
                ready = False
        return JSONResponse(status_code=200 if ready else 503, content={"ready": ready, "stages": report})

    async def _generator_busy(self) -> dict | None:
        """Why a generator gave no answer, when a job runs: one request at a time per generator replica,
        so the probe waits behind a video. Busy and ready while the job moves; not ready once its
        progress has stood still for longer than any step should take (`gateway.stalled_job_s`)."""
        quiet_s = await self.board.call(self.store.stalest_running_s)
        if quiet_s is None:
            return None
        limit = self.settings.stalled_job_s
        if quiet_s > limit:
            return {"error": f"a running job has reported no progress for {quiet_s:.0f} s (gateway.stalled_job_s = {limit:g})"}
        return {"busy": True, "note": "generating; the probe is queued behind the job"}

    @app.get("/v1/models")
    async def models(self) -> dict:
        card = ModelCard(id=self.model["id"], source=self.model["source"], layout=self.model["layout"], demo_model=self.model["demo_model"])
        adapters = [AdapterCard(id=name, parent=card.id) for name in self.settings.loras]
        return {"object": "list", "data": [card.model_dump()] + [adapter.model_dump() for adapter in adapters]}

    @app.get("/v1/config")
    async def config(self) -> dict:
        """What the web page needs: sizes, pins (locked controls), defaults, limits, demo flag, and the
        parameter table its controls are built from (names, defaults, ranges, help)."""
        return {
            "model": self.model,
            "sizes": list(SIZES),
            "parameters": parameter_table(adapters=self.settings.loras),
            "loras": list(self.settings.loras),
            "pins": self.admission.planner.pins.given(),
            "defaults": self.admission.planner.defaults.given(),
            "limits": self.admission.limits,
            **self.admission.planner.rules(),  # text_encoders, memory_policy, honor_request_offload
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
            job = await self.board.wait_terminal(job["id"])
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
        try:
            job = await self.admission.submit(request)
        except ApiError as error:
            if error.code == "queue_full":
                self.metrics.job("rejected")
            raise
        log.info("job %s queued (request %s)", job["id"], job["request_id"])
        self.metrics.job("queued")
        self.runner.wakeup.set()
        return job

    # -- read, cancel, delete -----------------------------------------------------------------

    async def _job(self, job_id: str) -> dict:
        job = await self.board.get(job_id)
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
            jobs, has_more = await self.board.call(self.store.list, limit, after, status, order)
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
        await self.board.call(self.store.delete, video_id)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    async def _cancel(self, job_id: str) -> tuple[dict, bool] | None:
        """The store's answer: the job and whether this call cancelled it; None for no such job."""
        outcome = await self.board.call(self.store.cancel, job_id)
        if outcome is not None and outcome[1]:
            self.metrics.job("cancelled")
            self.runner.stop_running(job_id)
            self.board.notify()
        return outcome

    # -- live progress ------------------------------------------------------------------------

    @app.get("/v1/videos/{video_id}/events")
    async def events(self, video_id: str) -> StreamingResponse:
        """Server-Sent Events: the current state first, then one event per step and phase change.

        A reconnecting client gets the current state, then what changes after it; the stream ends
        with a `done` event carrying the terminal job.
        """
        seq = await self.board.call(self.store.last_event_seq, video_id)  # before reading the state: no change falls between
        job = await self._job(video_id)
        return StreamingResponse(self._event_stream(job, seq), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _event_stream(self, job: dict, seq: int):
        yield _sse("state", job)
        if job["status"] in TERMINAL_STATUSES:
            yield _sse("done", job)
            return
        quiet_since = time.monotonic()
        while True:
            for seq, update in await self.board.call(self.store.events_after, job["id"], seq):
                quiet_since = time.monotonic()
                yield _sse("progress" if update["status"] == "in_progress" else "status", update)
                if update["status"] in TERMINAL_STATUSES:
                    yield _sse("done", update)
                    return
            if await self.board.call(self.store.get, job["id"]) is None:
                yield _sse("done", {**job, "status": "cancelled", "phase": "deleted"})
                return
            if time.monotonic() - quiet_since > SSE_KEEPALIVE_S:
                quiet_since = time.monotonic()
                yield ": keepalive\n\n"  # a comment line: keeps proxies from timing out a long step
            await self.board.changed_or_timeout()

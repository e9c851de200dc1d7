"""The `/v1/videos` API as Python calls, for the CLI: a failed call raises with the server's own message.

Kept apart from the command line so each client command is a few lines of printing around a call,
and light to import (httpx only): `wan-t2v generate` must not pay for torch or Ray.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
# A job can sit queued or inside one slow step for minutes without an event: never time out reading.
STREAM_TIMEOUT = httpx.Timeout(30.0, read=None)


class CliError(Exception):
    """A failure a command-line user can act on, and the exit code it ends the command with."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class ServerError(Exception):
    """A non-2xx answer, carrying the body's {"error": {code, message, fields}} when it has one."""

    def __init__(self, status: int, code: str, message: str, fields: list[dict] | None = None, retry_after: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.fields, self.retry_after = status, code, message, fields or [], retry_after

    @classmethod
    def from_response(cls, response: httpx.Response) -> ServerError:
        try:
            error = response.json()["error"]
            code, message, fields = error["code"], error["message"], error.get("fields", [])
        except (ValueError, KeyError, TypeError):
            code, message, fields = f"http_{response.status_code}", response.text.strip()[:500] or response.reason_phrase, []
        return cls(response.status_code, code, message, fields, response.headers.get("retry-after"))

    def lines(self) -> list[str]:
        """One line per rejected field (each names the field, the value and what is allowed), else the message."""
        lines = [field["message"] for field in self.fields] or [self.message]
        if self.retry_after:
            lines.append(f"the server asks to retry after {self.retry_after} s")
        return lines


class VideosClient:
    def __init__(self, url: str, api_key: str | None = None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url
        self.http = httpx.Client(base_url=url, headers=headers, timeout=60.0)

    def __enter__(self) -> VideosClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.http.close()

    def create(self, body: dict[str, Any]) -> dict:
        return self._json("POST", "/v1/videos", json=body)

    def retrieve(self, job_id: str) -> dict:
        return self._json("GET", f"/v1/videos/{job_id}")

    def list(self, **query: Any) -> dict:
        return self._json("GET", "/v1/videos", params={name: value for name, value in query.items() if value is not None})

    def cancel(self, job_id: str) -> dict:
        """Stops a queued or running job; one that has already ended is a 409 ServerError and stays as it is."""
        return self._json("POST", f"/v1/videos/{job_id}/cancel")

    def download(self, job_id: str, path: Path, variant: str = "video") -> Path:
        """Streams the content into `path` through a temporary sibling, so a broken transfer leaves no partial file."""
        partial = path.with_name(f".{path.name}.part")
        try:
            with self.http.stream("GET", f"/v1/videos/{job_id}/content", params={"variant": variant}) as response:
                self._check(response)
                with partial.open("wb") as file:
                    for chunk in response.iter_bytes():
                        file.write(chunk)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        return path

    def events(self, job_id: str) -> Iterator[tuple[str, dict]]:
        """The job's Server-Sent Events as (event, job) pairs, until the server closes the stream."""
        with self.http.stream("GET", f"/v1/videos/{job_id}/events", timeout=STREAM_TIMEOUT) as response:
            self._check(response)
            event, data = "message", []
            for line in response.iter_lines():
                if line.startswith("event:"):
                    event = line.removeprefix("event:").strip()
                elif line.startswith("data:"):
                    data.append(line.removeprefix("data:").strip())
                elif not line and data:
                    yield event, json.loads("\n".join(data))
                    event, data = "message", []

    def _json(self, method: str, path: str, **kwargs: Any) -> dict:
        response = self.http.request(method, path, **kwargs)
        self._check(response)
        return response.json()

    @staticmethod
    def _check(response: httpx.Response) -> None:
        if response.is_success:
            return
        response.read()  # a streamed error body is not read yet
        raise ServerError.from_response(response)

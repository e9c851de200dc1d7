"""HTTP accounting for bench/service_gpu.py's clients, and the `wan-t2v` CLI run with it.

The soak counts the status of every request its clients send. httpx clients (the benchmark's own,
and the one the openai SDK accepts as `http_client`) take `HttpLog.hooks()` as event hooks. The CLI
runs in a process of its own, so this file is also its launcher:

    python bench/service_gpu_clients.py RECORD.json generate PROMPT --size ... -o FILE --url URL

runs `deployments.cli.main` on the arguments after RECORD.json, unchanged except that its
VideosClient counts requests, and writes the counts to RECORD.json when the command ends.
"""

from __future__ import annotations

import json
import sys
import threading
from collections import Counter
from pathlib import Path


class HttpLog:
    """Requests sent and statuses answered; a request never answered is a connection error.

    The request hook runs before a request goes out and the response hook once its status line
    is in, so whatever is still pending when the client is done got no answer.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[int, object] = {}  # id -> the request itself (kept alive, so ids stay unique)
        self._statuses: Counter[int] = Counter()
        self._server_errors: list[str] = []
        self._lost: list[str] = []  # unanswered requests reported by another process (absorb)

    def hooks(self) -> dict[str, list]:
        return {"request": [self._sent], "response": [self._answered]}

    def _sent(self, request) -> None:
        with self._lock:
            self._pending[id(request)] = request

    def _answered(self, response) -> None:
        with self._lock:
            self._pending.pop(id(response.request), None)
            self._statuses[response.status_code] += 1
            if response.status_code >= 500:
                self._server_errors.append(f"{_line(response.request)} -> {response.status_code}")

    def absorb(self, summary: dict) -> None:
        """Count another process's requests (the CLI's) as this log's own."""
        with self._lock:
            self._statuses.update({int(status): count for status, count in summary["statuses"].items()})
            self._server_errors += summary["server_errors"]
            self._lost += summary["connection_errors"]

    def summary(self) -> dict:
        """Counts by status, and each failed request as "METHOD path -> status" or "-> no response"."""
        with self._lock:
            unanswered = self._lost + [f"{_line(request)} -> no response" for request in self._pending.values()]
            return {
                "requests": sum(self._statuses.values()) + len(unanswered),
                "statuses": {str(status): count for status, count in sorted(self._statuses.items())},
                "server_errors": list(self._server_errors),
                "connection_errors": unanswered,
            }


def _line(request) -> str:
    return f"{request.method} {request.url.path}"


def run_cli(record: Path, argv: list[str]) -> int:
    """`wan-t2v ARGV` with its requests counted into `record` (written however the command ends)."""
    from deployments import client
    from deployments.cli import main

    log = HttpLog()
    plain_init = client.VideosClient.__init__

    def counted_init(self, *args, **kwargs) -> None:
        plain_init(self, *args, **kwargs)
        self.http.event_hooks = log.hooks()

    client.VideosClient.__init__ = counted_init
    try:
        return main(argv)
    finally:
        record.write_text(json.dumps(log.summary()))


if __name__ == "__main__":
    sys.exit(run_cli(Path(sys.argv[1]), sys.argv[2:]))

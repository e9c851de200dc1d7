"""Where a replica's start-up time goes, phase by phase: for its log line and for /readyz."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class StartupPhases:
    """Seconds per named phase since creation; phases may run in parallel threads (then they overlap)."""

    def __init__(self):
        self.started = time.perf_counter()
        self.started_at = time.time()  # wall clock: lines the replica's start up against the launcher's log
        self.phases: dict[str, float] = {}
        self.total: float | None = None
        self._lock = threading.Lock()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self.phases[name] = round(time.perf_counter() - started, 3)

    def record(self, name: str, seconds: float) -> None:
        with self._lock:
            self.phases[name] = round(seconds, 3)

    def done(self) -> str:
        """Close the start-up; returns the summary for the log."""
        self.total = round(time.perf_counter() - self.started, 3)
        return f"ready in {self.total:.1f}s (" + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in self.phases.items()) + ")"

    def report(self) -> dict:
        return {"seconds": self.total, "started_at": round(self.started_at, 3), "phases": dict(self.phases)}

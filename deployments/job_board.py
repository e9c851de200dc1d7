"""The job store as the gateway's event loop sees it: every call on one thread, and a tick to wait on.

SQLite blocks (on the disk, on another replica's write lock) and the store's lock may be held by the
recovery thread, so no store call runs on the event loop. Waiters (SSE streams, sync requests) wake
on this replica's changes at once and poll now and then for other replicas'.
"""

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor

from deployments.jobs import JOB_ID, JobStore
from deployments.protocol import TERMINAL_STATUSES

POLL_S = 1.0  # how often a waiter looks at the store for changes made by other gateway replicas


class JobBoard:
    def __init__(self, store: JobStore):
        self.store = store
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="job-store")
        self._tick = asyncio.Event()  # set (and replaced) whenever this replica changes a job

    async def call(self, method, *args, **kwargs):
        """One JobStore call (`method` is a bound method of `self.store`), on the store's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, functools.partial(method, *args, **kwargs))

    async def get(self, job_id: str) -> dict | None:
        """The job, or None; only a well-formed id reaches the store."""
        return await self.call(self.store.get, job_id) if JOB_ID.match(job_id) else None

    def notify(self) -> None:
        """Wake every waiter; a fresh event makes the next wait block again (no lock to hold)."""
        self._tick.set()
        self._tick = asyncio.Event()

    async def changed_or_timeout(self, seconds: float = POLL_S) -> None:
        try:
            await asyncio.wait_for(self._tick.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass  # another replica may have moved the job: poll the store anyway

    async def wait_terminal(self, job_id: str) -> dict:
        """The job once it has ended; a deleted job reads as cancelled."""
        while True:
            job = await self.call(self.store.get, job_id)
            if job is None or job["status"] in TERMINAL_STATUSES:
                return job or {"id": job_id, "status": "cancelled", "error": {"code": "deleted", "message": "job deleted"}}
            await self.changed_or_timeout()

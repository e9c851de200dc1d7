"""Durable job store: SQLite in WAL mode plus MP4, thumbnail and JSON sidecar files.

Every accepted job is a row before the client hears 202, so a restart loses nothing: finished
videos stay downloadable and unfinished jobs are claimed again (at least once). A runner holds a
lease on the job it runs and renews it, so each job has one runner even with several gateway
replicas. Another runner takes a job over at once when its owner is known dead (`requeue_orphans`:
a restarted gateway resumes its jobs immediately), or once the lease expires (`lease_seconds`, 30 s
by default: only a runner that is alive but stuck waits that long). Files are written under a
temporary name and renamed, and a job is marked completed only after its files exist, so a partial
video is never served.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from deployments.protocol import TERMINAL_STATUSES
from pipeline.files import write_atomic

JOB_ID = re.compile(r"^video_[0-9a-f]{24}$")
ACTIVE = ("queued", "in_progress")
EVENT_RETENTION_S = 600  # SSE readers start from the current state, so old events serve no one

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,       -- submission order
    id TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL,
    lease_owner TEXT,
    lease_expires REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    job TEXT NOT NULL,                           -- the job object, JSON
    work TEXT NOT NULL                           -- what the runner needs, JSON (not shown to users)
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, seq);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    at REAL NOT NULL,
    job TEXT NOT NULL                            -- the job object after this event
);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id, seq);
"""


class QueueFull(Exception):
    pass


def new_job_id() -> str:
    return "video_" + secrets.token_hex(12)


class JobStore:
    """One SQLite connection per process, shared by its tasks and threads under a lock.

    Several gateway replicas (processes) share the file; SQLite's own locking orders their writes.
    """

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.video_dir = self.output_dir / "videos"
        self.video_dir.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.output_dir / "jobs.sqlite3", check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE takes the write lock up front, so read-then-write steps never interleave."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    @staticmethod
    def _save(db: sqlite3.Connection, job: dict, **columns: Any) -> None:
        """Store the job object and record it as an event (what SSE streams relay)."""
        now = time.time()
        sets = ", ".join(f"{name} = ?" for name in ("status", "job", *columns))
        db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (job["status"], json.dumps(job), *columns.values(), job["id"]))
        db.execute("INSERT INTO events (job_id, at, job) VALUES (?, ?, ?)", (job["id"], now, json.dumps(job)))
        if job["status"] in TERMINAL_STATUSES:
            db.execute("DELETE FROM events WHERE at < ?", (now - EVENT_RETENTION_S,))

    def _shown(self, row: sqlite3.Row) -> dict:
        """The job object as users see it: stored fields plus the live queue position."""
        job = json.loads(row["job"])
        job["queue_position"] = self._queue_position(row["seq"]) if row["status"] == "queued" else None
        return job

    # -- submit and read ----------------------------------------------------------------------

    def create(self, job: dict, work: dict, max_pending: int) -> dict:
        """Add a queued job, or raise QueueFull when max_pending jobs already wait."""
        with self._transaction() as db:
            pending = db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()[0]
            if pending >= max_pending:
                raise QueueFull(f"{pending} jobs are waiting (max_pending_jobs = {max_pending})")
            db.execute("INSERT INTO jobs (id, status, job, work) VALUES (?, ?, ?, ?)", (job["id"], job["status"], json.dumps(job), json.dumps(work)))
            db.execute("INSERT INTO events (job_id, at, job) VALUES (?, ?, ?)", (job["id"], time.time(), json.dumps(job)))
        return self.get(job["id"])

    def get(self, job_id: str) -> dict | None:
        rows = self._read("SELECT seq, status, job FROM jobs WHERE id = ?", (job_id,))
        return self._shown(rows[0]) if rows else None

    def count(self, status: str) -> int:
        return self._read("SELECT COUNT(*) FROM jobs WHERE status = ?", (status,))[0][0]

    def stalest_running_s(self) -> float | None:
        """Seconds since the running job that changed least recently last changed; None when none runs."""
        rows = self._read(
            "SELECT MIN(COALESCE(last, 0)) FROM (SELECT (SELECT MAX(at) FROM events WHERE job_id = jobs.id) AS last "
            "FROM jobs WHERE status = 'in_progress')"
        )
        last = rows[0][0]
        return None if last is None else time.time() - last

    def _queue_position(self, seq: int) -> int:
        return self._read("SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND seq <= ?", (seq,))[0][0]

    def list(self, limit: int, after: str | None = None, status: str | None = None, order: str = "desc") -> tuple[list[dict], bool]:
        """A page of jobs in submission order (newest first by default) and whether more follow.

        `after` is the id of the last job of the previous page; an unknown id raises KeyError.
        """
        clauses, args = [], []
        if status:
            clauses.append("status = ?")
            args.append(status)
        if after:
            anchor = self._read("SELECT seq FROM jobs WHERE id = ?", (after,))
            if not anchor:
                raise KeyError(after)
            clauses.append("seq < ?" if order == "desc" else "seq > ?")
            args.append(anchor[0]["seq"])
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        direction = "DESC" if order == "desc" else "ASC"
        rows = self._read(f"SELECT seq, status, job FROM jobs {where} ORDER BY seq {direction} LIMIT ?", (*args, limit + 1))
        return [self._shown(row) for row in rows[:limit]], len(rows) > limit

    def events_after(self, job_id: str, seq: int) -> list[tuple[int, dict]]:
        rows = self._read("SELECT seq, job FROM events WHERE job_id = ? AND seq > ? ORDER BY seq", (job_id, seq))
        return [(row["seq"], json.loads(row["job"])) for row in rows]

    def last_event_seq(self, job_id: str) -> int:
        return self._read("SELECT COALESCE(MAX(seq), 0) FROM events WHERE job_id = ?", (job_id,))[0][0]

    # -- running ------------------------------------------------------------------------------

    def claim(self, owner: str, lease_seconds: float, capacity: int) -> tuple[dict, dict] | None:
        """Take the oldest runnable job: queued, or in progress under a lease that has expired.

        At most `capacity` jobs (the generator replicas) run at once across all gateway replicas,
        so jobs start in submission order and the rest show a queue position.
        """
        now = time.time()
        with self._transaction() as db:
            running = db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'in_progress' AND lease_expires >= ?", (now,)).fetchone()[0]
            if running >= capacity:
                return None
            row = db.execute(
                "SELECT id, job, work, attempts FROM jobs WHERE status = 'queued' "
                "OR (status = 'in_progress' AND lease_expires < ?) ORDER BY seq LIMIT 1",
                (now,),
            ).fetchone()
            if row is None:
                return None
            attempts = row["attempts"] + 1
            job = json.loads(row["job"])
            job.update(status="in_progress", phase="starting", step=0, progress=0, attempts=attempts,
                       started_at=int(now), queue_position=None, error=None)
            self._save(db, job, lease_owner=owner, lease_expires=now + lease_seconds, attempts=attempts)
        return job, json.loads(row["work"])

    def requeue_orphans(self, is_alive: Callable[[str], bool]) -> list[str]:
        """Queue again, keeping their place, the running jobs whose lease owner is known to be dead.

        Without this a restarted gateway would wait out the dead owner's lease before rerunning them.
        """
        owners = [row[0] for row in self._read("SELECT DISTINCT lease_owner FROM jobs WHERE status = 'in_progress'")]
        dead = [owner for owner in owners if not is_alive(owner)]
        requeued: list[str] = []
        if not dead:
            return requeued
        with self._transaction() as db:
            for owner in dead:
                for row in db.execute("SELECT job FROM jobs WHERE status = 'in_progress' AND lease_owner = ?", (owner,)).fetchall():
                    job = {**json.loads(row["job"]), "status": "queued", "phase": "queued", "step": 0, "progress": 0}
                    self._save(db, job, lease_owner=None, lease_expires=None)
                    requeued.append(job["id"])
        return requeued

    def renew(self, job_id: str, owner: str, lease_seconds: float) -> bool:
        """Extend the lease; False when the job is no longer ours to run (cancelled, deleted, taken)."""
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE jobs SET lease_expires = ? WHERE id = ? AND lease_owner = ? AND status = 'in_progress'",
                (time.time() + lease_seconds, job_id, owner),
            )
            return cursor.rowcount == 1

    def update(self, job_id: str, owner: str, **fields: Any) -> dict | None:
        """Apply fields to a job this owner runs; None when it is no longer ours (e.g. cancelled)."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT job FROM jobs WHERE id = ? AND lease_owner = ? AND status = 'in_progress'", (job_id, owner)
            ).fetchone()
            if row is None:
                return None
            job = {**json.loads(row["job"]), **fields}
            released = {"lease_owner": None, "lease_expires": None} if job["status"] != "in_progress" else {}
            self._save(db, job, **released)
        return job

    def cancel(self, job_id: str) -> tuple[dict, bool] | None:
        """Cancel a queued or running job; the runner notices on its next step or renewal.

        Returns the job as it now is and whether this call cancelled it (False: it had already
        ended), or None for no such job. The look and the change share one write-locked
        transaction, so a job completing at the same moment is either cancelled or reported as
        finished: callers never decide from a status read earlier.
        """
        with self._transaction() as db:
            row = db.execute("SELECT status, job FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            job = json.loads(row["job"])
            if row["status"] not in ACTIVE:
                return job, False
            job.update(status="cancelled", phase="cancelled", queue_position=None, completed_at=int(time.time()))
            self._save(db, job, lease_owner=None, lease_expires=None)
        return job, True

    def delete(self, job_id: str) -> bool:
        with self._transaction() as db:
            deleted = db.execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount == 1
            db.execute("DELETE FROM events WHERE job_id = ?", (job_id,))
        self.delete_files(job_id)
        return deleted

    # -- files --------------------------------------------------------------------------------

    def files(self, job_id: str) -> dict[str, Path]:
        return {
            "video": self.video_dir / f"{job_id}.mp4",
            "thumbnail": self.video_dir / f"{job_id}.jpg",
            "sidecar": self.video_dir / f"{job_id}.json",
        }

    def write_result(self, job: dict, mp4: bytes, thumbnail: bytes) -> None:
        paths = self.files(job["id"])
        write_atomic(paths["video"], mp4)
        write_atomic(paths["thumbnail"], thumbnail)
        write_atomic(paths["sidecar"], json.dumps(job, indent=2, ensure_ascii=False).encode())

    def delete_files(self, job_id: str) -> None:
        for path in self.files(job_id).values():
            path.unlink(missing_ok=True)

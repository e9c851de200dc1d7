"""Durable job store: SQLite in WAL mode plus MP4, thumbnail and JSON sidecar files.

Every accepted job is a row before the client hears 202, so a restart loses nothing: finished
videos stay downloadable and unfinished jobs are claimed again (at least once). A runner holds a
lease on the job it runs and renews it; with several gateway replicas another may take the job over
only once that lease has expired. Files are written under a temporary name and renamed, and a job
is marked completed only after its files exist, so a partial video is never served.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sqlite3
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

JOB_ID = re.compile(r"^video_[0-9a-f]{24}$")
ACTIVE = ("queued", "in_progress")

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
    job TEXT NOT NULL                            -- the job object after this event
);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id, seq);
"""


class QueueFull(Exception):
    pass


def new_job_id() -> str:
    return "video_" + secrets.token_hex(12)


def write_atomic(path: Path, data: bytes) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


class JobStore:
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

    # -- transactions -------------------------------------------------------------------------

    def _transaction(self):
        store = self

        class Transaction:
            def __enter__(self):
                store._lock.acquire()
                store._db.execute("BEGIN IMMEDIATE")
                return store._db

            def __exit__(self, kind, value, traceback):
                store._db.execute("COMMIT" if kind is None else "ROLLBACK")
                store._lock.release()

        return Transaction()

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    @staticmethod
    def _save(db: sqlite3.Connection, job: dict, **columns: Any) -> None:
        sets = ", ".join(f"{name} = ?" for name in ("status", "job", *columns))
        db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (job["status"], json.dumps(job), *columns.values(), job["id"]))
        db.execute("INSERT INTO events (job_id, job) VALUES (?, ?)", (job["id"], json.dumps(job)))

    # -- submit and read ----------------------------------------------------------------------

    def create(self, job: dict, work: dict, max_pending: int) -> dict:
        with self._transaction() as db:
            pending = db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()[0]
            if pending >= max_pending:
                raise QueueFull(f"{pending} jobs are waiting (max_pending_jobs = {max_pending})")
            db.execute("INSERT INTO jobs (id, status, job, work) VALUES (?, ?, ?, ?)", (job["id"], job["status"], json.dumps(job), json.dumps(work)))
            db.execute("INSERT INTO events (job_id, job) VALUES (?, ?)", (job["id"], json.dumps(job)))
        return self.get(job["id"])

    def get(self, job_id: str) -> dict | None:
        rows = self._read("SELECT seq, status, job FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            return None
        job = json.loads(rows[0]["job"])
        job["queue_position"] = self._queue_position(rows[0]["seq"]) if rows[0]["status"] == "queued" else None
        return job

    def _queue_position(self, seq: int) -> int:
        return self._read("SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND seq <= ?", (seq,))[0][0]

    def list(self, limit: int, after: str | None, status: str | None, order: str = "desc") -> tuple[list[dict], bool]:
        """Newest first by default; `after` is the id of the last job of the previous page."""
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
        rows = self._read(f"SELECT id FROM jobs {where} ORDER BY seq {direction} LIMIT ?", (*args, limit + 1))
        jobs = [self.get(row["id"]) for row in rows[:limit]]
        return [job for job in jobs if job is not None], len(rows) > limit

    def pending_count(self) -> int:
        return self._read("SELECT COUNT(*) FROM jobs WHERE status = 'queued'")[0][0]

    def count_by_status(self) -> dict[str, int]:
        return {row[0]: row[1] for row in self._read("SELECT status, COUNT(*) FROM jobs GROUP BY status")}

    def events_after(self, job_id: str, seq: int) -> list[tuple[int, dict]]:
        rows = self._read("SELECT seq, job FROM events WHERE job_id = ? AND seq > ? ORDER BY seq", (job_id, seq))
        return [(row["seq"], json.loads(row["job"])) for row in rows]

    def last_event_seq(self, job_id: str) -> int:
        return self._read("SELECT COALESCE(MAX(seq), 0) FROM events WHERE job_id = ?", (job_id,))[0][0]

    # -- running ------------------------------------------------------------------------------

    def claim(self, owner: str, lease_seconds: float) -> tuple[dict, dict] | None:
        """Take the oldest runnable job: queued, or in progress under a lease that has expired."""
        now = time.time()
        with self._transaction() as db:
            row = db.execute(
                "SELECT id, job, work, attempts FROM jobs WHERE status = 'queued' "
                "OR (status = 'in_progress' AND lease_expires < ?) ORDER BY seq LIMIT 1",
                (now,),
            ).fetchone()
            if row is None:
                return None
            job = json.loads(row["job"])
            job.update(status="in_progress", phase="starting", attempts=row["attempts"] + 1, started_at=int(now), error=None)
            self._save(db, job, lease_owner=owner, lease_expires=now + lease_seconds, attempts=row["attempts"] + 1)
        return job, json.loads(row["work"])

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

    def cancel(self, job_id: str) -> dict | None:
        """Cancel a queued or running job; the runner notices on its next step or renewal."""
        with self._transaction() as db:
            row = db.execute("SELECT job FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            job = json.loads(row["job"])
            if job["status"] in ACTIVE:
                job.update(status="cancelled", phase="cancelled", completed_at=int(time.time()))
                self._save(db, job, lease_owner=None, lease_expires=None)
        return job

    def delete(self, job_id: str) -> bool:
        with self._transaction() as db:
            deleted = db.execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount == 1
            db.execute("DELETE FROM events WHERE job_id = ?", (job_id,))
        for path in self.files(job_id).values():
            path.unlink(missing_ok=True)
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

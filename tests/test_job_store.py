"""JobStore without Ray: the durable queue's rules (order, leases, cancel, pages, atomic files)."""

import os
import sqlite3
import time
from pathlib import Path

import pytest

from deployments import jobs
from deployments.jobs import JobStore, QueueFull, new_job_id
from pipeline.files import write_atomic


def submit(store: JobStore, max_pending: int = 100, **fields) -> dict:
    job = {"id": new_job_id(), "status": "queued", "phase": "queued", "step": 0, "progress": 0, "created_at": int(time.time()), **fields}
    return store.create(job, {"params": {"prompt": "p"}}, max_pending)


@pytest.fixture
def store(tmp_path) -> JobStore:
    return JobStore(tmp_path)


def test_create_stores_a_queued_job_with_its_place_in_the_queue(store):
    first, second = submit(store), submit(store)
    assert store.get(first["id"])["queue_position"] == 1
    assert second["queue_position"] == 2
    assert store.get(new_job_id()) is None


def test_jobs_survive_a_new_store_on_the_same_folder(tmp_path):
    job = submit(JobStore(tmp_path))
    assert JobStore(tmp_path).get(job["id"])["status"] == "queued"
    assert sqlite3.connect(tmp_path / "jobs.sqlite3").execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_queue_full_past_max_pending(store):
    submit(store, max_pending=2)
    submit(store, max_pending=2)
    with pytest.raises(QueueFull):
        submit(store, max_pending=2)
    store.claim("runner", 30, capacity=1)  # a running job no longer waits
    submit(store, max_pending=2)


def test_claim_takes_jobs_in_submission_order_up_to_capacity(store):
    first, second, third = submit(store), submit(store), submit(store)
    job, work = store.claim("a", 30, capacity=2)
    assert job["id"] == first["id"] and job["status"] == "in_progress" and job["attempts"] == 1
    assert work == {"params": {"prompt": "p"}}
    assert store.claim("b", 30, capacity=2)[0]["id"] == second["id"]
    assert store.claim("c", 30, capacity=2) is None  # every generator is busy
    assert store.get(third["id"])["queue_position"] == 1


def test_an_expired_lease_lets_another_runner_take_the_job(store):
    job = submit(store)
    store.claim("a", 0.05, capacity=1)
    assert store.claim("b", 30, capacity=1) is None
    time.sleep(0.1)
    taken, _ = store.claim("b", 30, capacity=1)
    assert taken["id"] == job["id"] and taken["attempts"] == 2
    assert not store.renew(job["id"], "a", 30)  # the first runner learns it lost the job
    assert store.update(job["id"], "a", step=3) is None
    assert store.update(job["id"], "b", step=3)["step"] == 3


def test_renew_keeps_the_lease(store):
    job = submit(store)
    store.claim("a", 0.2, capacity=1)
    for _ in range(3):
        time.sleep(0.1)
        assert store.renew(job["id"], "a", 0.2)
    assert store.claim("b", 30, capacity=2) is None


def test_orphans_of_a_dead_owner_are_queued_again_at_once(store):
    dead, alive, waiting = submit(store), submit(store), submit(store)
    store.claim("gone/0", 30, capacity=2)
    store.claim("here/0", 30, capacity=2)
    assert store.requeue_orphans(lambda owner: owner.startswith("here")) == [dead["id"]]
    again = store.get(dead["id"])
    assert again["status"] == "queued" and again["queue_position"] == 1  # keeps its place before `waiting`
    assert store.get(waiting["id"])["queue_position"] == 2
    assert store.claim("here/1", 30, capacity=2)[0]["id"] == dead["id"]
    assert store.get(alive["id"])["status"] == "in_progress"


def test_update_to_a_terminal_status_releases_the_lease(store):
    job = submit(store)
    store.claim("a", 30, capacity=1)
    done = store.update(job["id"], "a", status="completed", progress=100)
    assert done["status"] == "completed"
    assert store.update(job["id"], "a", step=1) is None
    assert store.claim("a", 30, capacity=1) is None


def test_cancel_stops_queued_and_running_jobs_and_leaves_finished_ones(store, tmp_path):
    queued, running = submit(store), submit(store)
    store.claim("a", 30, capacity=1)  # takes `queued`, the oldest
    job, cancelled = store.cancel(running["id"])
    assert (job["status"], cancelled) == ("cancelled", True)
    assert store.cancel(queued["id"])[0]["status"] == "cancelled"
    assert store.update(queued["id"], "a", step=1) is None  # the runner sees it is no longer its job
    assert not store.renew(queued["id"], "a", 30)
    assert store.cancel(queued["id"])[1] is False  # already cancelled: not counted twice
    assert store.cancel(new_job_id()) is None

    done = submit(store)
    store.claim("a", 30, capacity=1)
    store.update(done["id"], "a", status="completed")
    job, cancelled = JobStore(tmp_path).cancel(done["id"])  # another replica's store, as a second gateway would ask
    assert (job["status"], cancelled) == ("completed", False)
    assert store.get(done["id"])["status"] == "completed"


def test_events_record_every_change_in_order(store):
    job = submit(store)
    seq = store.last_event_seq(job["id"])
    store.claim("a", 30, capacity=1)
    for step in (1, 2):
        store.update(job["id"], "a", phase="denoise", step=step)
    events = store.events_after(job["id"], seq)
    assert [(event["status"], event.get("step")) for _, event in events] == [("in_progress", 0), ("in_progress", 1), ("in_progress", 2)]
    assert store.events_after(job["id"], events[-1][0]) == []


def test_old_events_are_pruned_when_a_job_ends(store, monkeypatch):
    job = submit(store)
    store.claim("a", 30, capacity=1)
    monkeypatch.setattr(jobs, "EVENT_RETENTION_S", -1)
    store.update(job["id"], "a", status="completed")
    assert store.events_after(job["id"], 0) == []


def test_delete_removes_the_row_and_the_files(store):
    job = submit(store)
    store.claim("a", 30, capacity=1)
    store.write_result({**job, "status": "completed"}, b"mp4", b"jpeg")
    assert all(path.exists() for path in store.files(job["id"]).values())
    store.update(job["id"], "a", status="completed")
    assert store.delete(job["id"])
    assert store.get(job["id"]) is None
    assert not any(path.exists() for path in store.files(job["id"]).values())
    assert not store.delete(job["id"])


def test_list_pages_newest_first_with_after_and_status(store):
    ids = [submit(store)["id"] for _ in range(5)]
    store.claim("a", 30, capacity=1)  # ids[0] runs
    page, more = store.list(limit=2)
    assert [job["id"] for job in page] == [ids[4], ids[3]] and more
    page, more = store.list(limit=2, after=ids[3])
    assert [job["id"] for job in page] == [ids[2], ids[1]] and more
    page, more = store.list(limit=2, after=ids[1])
    assert [job["id"] for job in page] == [ids[0]] and not more
    page, more = store.list(limit=10, order="asc", status="queued")
    assert [job["id"] for job in page] == ids[1:] and not more
    assert [job["queue_position"] for job in page] == [1, 2, 3, 4]
    with pytest.raises(KeyError):
        store.list(limit=2, after=new_job_id())


def test_write_atomic_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "video.mp4"
    write_atomic(path, b"old")

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        write_atomic(path, b"new and partial")
    assert path.read_bytes() == b"old"
    assert [p.name for p in Path(tmp_path).iterdir()] == ["video.mp4"]  # no temporary left behind


def test_stalest_running_s_is_the_quiet_time_of_the_running_job_that_moved_least_recently(store, monkeypatch):
    """What /readyz reads to tell a busy generator from a stuck one."""
    assert store.stalest_running_s() is None  # nothing runs
    clock = [1000.0]
    monkeypatch.setattr(jobs.time, "time", lambda: clock[0])
    moving, stuck = submit(store), submit(store)
    store.claim("a", 3600, capacity=2)
    store.claim("b", 3600, capacity=2)
    clock[0] = 1100.0
    store.update(moving["id"], "a", step=5)
    clock[0] = 1130.0
    assert store.stalest_running_s() == pytest.approx(130.0)  # `stuck` has not changed since its claim
    store.update(stuck["id"], "b", step=1)
    assert store.stalest_running_s() == pytest.approx(30.0)
    store.update(moving["id"], "a", status="completed")
    store.update(stuck["id"], "b", status="failed")
    assert store.stalest_running_s() is None

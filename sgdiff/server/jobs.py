"""Video jobs on disk: one SQLite table (stdlib sqlite3, WAL) under --state-dir, the MP4s beside it.
A restart finds every job: finished ones as they were, ones that were queued queued again, and ones
that were running when the server stopped (even by kill -9) failed with the reason."""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ID_PREFIX = "video_"
ID_HEX = 32  # 128 random bits: ids cannot be guessed, and are checked before they touch a path
INTERRUPTED = "interrupted: the server stopped while this job ran; create it again"

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,          -- queued, in_progress, completed, failed, cancelled
    created_at INTEGER NOT NULL,
    completed_at INTEGER,
    prompt TEXT NOT NULL,
    request TEXT NOT NULL,         -- JSON: the engine's fields, to run it again after a restart
    size TEXT NOT NULL,
    seconds TEXT NOT NULL,
    progress INTEGER NOT NULL DEFAULT 0,
    error TEXT                     -- JSON {"code", "message"} when failed
)
"""


def new_id() -> str:
    return ID_PREFIX + secrets.token_hex(ID_HEX // 2)


def valid_id(job_id: str) -> bool:
    rest = job_id.removeprefix(ID_PREFIX)
    return job_id.startswith(ID_PREFIX) and len(rest) == ID_HEX and all(c in "0123456789abcdef" for c in rest)


@dataclass
class Job:
    id: str
    status: str
    created_at: int
    completed_at: int | None
    prompt: str
    request: dict[str, Any]
    size: str
    seconds: str
    progress: int
    error: dict[str, str] | None


class JobStore:
    """Thread-safe; every change is committed before the call returns."""

    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self.videos = state_dir / "videos"
        self.inputs = state_dir / "inputs"
        for folder in (self.videos, self.inputs):
            folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(state_dir / "jobs.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def video_path(self, job_id: str) -> Path:
        return self.videos / f"{job_id}.mp4"

    def input_path(self, job_id: str, index: int = 0) -> Path:
        return self.inputs / f"{job_id}_{index}.img"

    def recover(self) -> list[Job]:
        """After a restart: jobs that were running fail with the reason; the queued ones are returned,
        oldest first, to be queued again."""
        now = int(time.time())
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET status='failed', completed_at=?, error=? WHERE status='in_progress'",
                (now, json.dumps({"code": "interrupted", "message": INTERRUPTED})),
            )
        return [job for job in self.list(order="asc") if job.status == "queued"]

    def add(self, job: Job) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.id, job.status, job.created_at, job.completed_at, job.prompt, json.dumps(job.request),
                 job.size, job.seconds, job.progress, None),
            )  # fmt: skip

    def update(self, job_id: str, status: str, progress: int | None = None, error: dict | None = None) -> None:
        finished = status in ("completed", "failed", "cancelled")
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET status=?, progress=COALESCE(?, progress), error=?, completed_at=? WHERE id=?",
                (status, progress, json.dumps(error) if error else None, int(time.time()) if finished else None,
                 job_id),
            )  # fmt: skip

    def get(self, job_id: str) -> Job | None:
        if not valid_id(job_id):
            return None
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return _job(row) if row else None

    def list(self, after: str | None = None, limit: int = 20, order: str = "desc") -> list[Job]:
        """Newest first (order "desc") or oldest first; `after`: a job id, for the next page."""
        direction = "DESC" if order == "desc" else "ASC"
        query, args = "SELECT * FROM jobs", []
        if after is not None and (anchor := self.get(after)) is not None:
            sign = "<" if order == "desc" else ">"
            query += f" WHERE (created_at, id) {sign} (?, ?)"
            args = [anchor.created_at, anchor.id]
        query += f" ORDER BY created_at {direction}, id {direction} LIMIT ?"
        with self._lock:
            rows = self._db.execute(query, (*args, limit if limit > 0 else -1)).fetchall()
        return [_job(row) for row in rows]

    def delete(self, job_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM jobs WHERE id=?", (job_id,))
        self.video_path(job_id).unlink(missing_ok=True)
        for path in self.inputs.glob(f"{job_id}_*"):
            path.unlink(missing_ok=True)


def _job(row: tuple) -> Job:
    job_id, status, created, completed, prompt, request, size, seconds, progress, error = row
    return Job(job_id, status, created, completed, prompt, json.loads(request), size, seconds, progress,
               json.loads(error) if error else None)  # fmt: skip

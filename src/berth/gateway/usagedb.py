"""Usage per key, kept across restarts: an embedded SQLite database in BERTH_HOME (`usage.sqlite3`, mode 0600).

One row per key, model and hour: requests, errors, prompt and completion tokens. Rows older than
`KEEP_SECONDS` go, and at most `MAX_ROWS` are kept (the oldest hours go first), so the file stays small
(a row is well under 100 bytes: 100,000 rows are a few MB). Every call is synchronous: the caller runs
it in a thread. Counting happens in memory (`accounts.py`); this module only stores and reads hours.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

USAGE_FILE = "usage.sqlite3"  # in BERTH_HOME
HOUR = 3600
KEEP_SECONDS = 400 * 86400  # a little over a year of hours
MAX_ROWS = 100_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    key TEXT NOT NULL, model TEXT NOT NULL, hour INTEGER NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0, errors INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key, model, hour)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS usage_by_hour ON usage (hour);
"""


@dataclass
class Tally:
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, other: "Tally") -> None:
        for name in _TALLY_FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_json(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in _TALLY_FIELDS}


_TALLY_FIELDS = tuple(f.name for f in fields(Tally))
UsageKey = tuple[str, str, int]  # key name, model, hour (epoch seconds at the hour's start)


def hour_of(epoch: float) -> int:
    return int(epoch // HOUR) * HOUR


class UsageStore:
    def __init__(self, path: Path, keep_seconds: int = KEEP_SECONDS, max_rows: int = MAX_ROWS) -> None:
        self.path = path
        self.keep_seconds, self.max_rows = keep_seconds, max_rows
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # one thread at a time uses the connection

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # created 0600 before SQLite opens it; SQLite gives its journal the database's permissions
            os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
            os.chmod(self.path, 0o600)
            db = sqlite3.connect(self.path, timeout=10, check_same_thread=False, isolation_level=None)
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    def add(self, tallies: Mapping[UsageKey, Tally], now: float) -> None:
        """Add hours' counts to what is stored, then drop what is too old or too much."""
        if not tallies:
            return
        with self._lock:
            db = self._connection()
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(
                    "INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key, model, hour) DO UPDATE SET "
                    "requests = requests + excluded.requests, errors = errors + excluded.errors, "
                    "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
                    "completion_tokens = completion_tokens + excluded.completion_tokens",
                    [(key, model, hour, t.requests, t.errors, t.prompt_tokens, t.completion_tokens)
                     for (key, model, hour), t in tallies.items()])
                db.execute("DELETE FROM usage WHERE hour < ?", (hour_of(now - self.keep_seconds),))
                (count,) = db.execute("SELECT count(*) FROM usage").fetchone()
                if count > self.max_rows:
                    db.execute("DELETE FROM usage WHERE (key, model, hour) IN "
                               "(SELECT key, model, hour FROM usage ORDER BY hour LIMIT ?)", (count - self.max_rows,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def read(self, since_hour: int, key: str | None = None) -> dict[UsageKey, Tally]:
        """Stored hours from `since_hour` on, of one key or all; nothing when no file was ever written."""
        if self._db is None and not self.path.exists():
            return {}
        with self._lock:
            db = self._connection()
            query = "SELECT key, model, hour, requests, errors, prompt_tokens, completion_tokens FROM usage WHERE hour >= ?"
            args: tuple[object, ...] = (since_hour,)
            if key is not None:
                query += " AND key = ?"
                args += (key,)
            return {(k, m, h): Tally(*counts) for k, m, h, *counts in db.execute(query, args)}

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

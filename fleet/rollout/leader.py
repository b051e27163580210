"""One active rollout controller among several fleet processes.

On PostgreSQL the controller loop holds a session-level advisory lock on a connection of
its own: the first process to take it acts, the others try again every interval and
take over when the holder dies (its connection closes, the lock is freed). On SQLite,
where processes share one host, an exclusive ``flock`` on a file beside the database
does the same. ``ControllerLoop`` runs ``controller.tick()`` only while it holds the
lock, and the retention job with it.

States of the loop: standby --lock taken--> active --connection lost--> standby.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy.engine import Connection, Engine

from fleet import metrics

log = logging.getLogger(__name__)

# Advisory locks are per database, not per schema: the key is derived from the database
# and the schema so that two fleets sharing a PostgreSQL database in separate schemas
# each elect their own controller.
CONTROLLER_LOCK_NAME = "edgefleet controller"


def controller_lock_key(database: str, schema: str) -> int:
    digest = hashlib.sha256(f"{CONTROLLER_LOCK_NAME}:{database}:{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class LeaderLock(Protocol):
    def try_acquire(self) -> bool: ...
    def still_held(self) -> bool: ...
    def release(self) -> None: ...


class PgAdvisoryLock:
    """``pg_try_advisory_lock`` on a dedicated connection, kept open while held."""

    def __init__(self, engine: Engine, key: int | None = None) -> None:
        self.engine = engine
        self.key = key
        self._conn: Connection | None = None

    def try_acquire(self) -> bool:
        self.release()
        conn = self.engine.connect()
        try:
            if self.key is None:
                db, schema = conn.exec_driver_sql("SELECT current_database(), current_schema()").one()
                self.key = controller_lock_key(str(db), str(schema))
            got = bool(conn.exec_driver_sql(f"SELECT pg_try_advisory_lock({int(self.key)})").scalar())
            conn.commit()
        except Exception:
            conn.close()
            raise
        if got:
            self._conn = conn
        else:
            conn.close()
        return got

    def still_held(self) -> bool:
        if self._conn is None:
            return False
        try:
            # a session-level advisory lock lasts as long as the session: alive means held
            self._conn.exec_driver_sql("SELECT 1").scalar()
            self._conn.commit()
            return True
        except Exception:
            log.warning("controller: lost the database connection that holds the leader lock")
            self.release()
            return False

    def release(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.invalidate()  # closing the session frees the lock
            self._conn.close()
            self._conn = None


class FileLock:
    """An exclusive flock on ``path`` (processes on one host, e.g. sharing SQLite)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def still_held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def lock_for(engine: Engine, data_dir: Path) -> LeaderLock:
    if engine.dialect.name == "postgresql":
        return PgAdvisoryLock(engine)
    database = engine.url.database
    where = Path(database).parent if database and database != ":memory:" else Path(data_dir)
    return FileLock(where / "controller.lock")


class ControllerLoop:
    """A thread: wait for the leader lock, then call ``tick`` every interval while held."""

    def __init__(
        self,
        tick: Callable[[], Any],
        lock: LeaderLock,
        *,
        interval_s: float = 1.0,
        standby_interval_s: float | None = None,
        periodic: list[tuple[float, Callable[[], Any]]] | None = None,
    ) -> None:
        self.tick = tick
        self.lock = lock
        self.interval_s = interval_s
        self.standby_interval_s = standby_interval_s or max(interval_s, 1.0)
        self.periodic = [(every, fn, [0.0]) for every, fn in (periodic or [])]
        self.active = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="controller-loop", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)
            self._thread = None
        self._set_active(False)
        self.lock.release()

    def _set_active(self, active: bool) -> None:
        if active and not self.active.is_set():
            log.info("controller: took the leader lock; process %d now drives rollouts", os.getpid())
        elif not active and self.active.is_set():
            log.warning("controller: no longer the leader; standing by")
        if active:
            self.active.set()
        else:
            self.active.clear()
        metrics.CONTROLLER_ACTIVE.set(1 if active else 0)

    def _run(self) -> None:
        logged_standby = False
        while not self._stop.is_set():
            try:
                held = self.lock.still_held() or self.lock.try_acquire()
            except Exception as exc:
                log.warning("controller: cannot reach the database for the leader lock: %s", exc)
                held = False
            self._set_active(held)
            if not held:
                if not logged_standby:
                    log.info("controller: another process holds the leader lock; standing by")
                    logged_standby = True
                self._stop.wait(self.standby_interval_s)
                continue
            logged_standby = False
            try:
                self.tick()
                metrics.CONTROLLER_TICKS.inc()
            except Exception:
                log.exception("controller tick failed")
            self._run_periodic()
            self._stop.wait(self.interval_s)

    def _run_periodic(self) -> None:
        now = time.monotonic()
        for every, fn, last in self.periodic:
            if last[0] and now - last[0] < every:
                continue
            last[0] = now
            try:
                fn()
            except Exception:
                log.exception("controller: periodic job %s failed", getattr(fn, "__name__", fn))

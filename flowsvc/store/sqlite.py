"""The SQLite execution store: the only module that knows SQL.

One connection lives on one worker thread, so the event loop never waits on the disk.
Calls queue up as jobs; the thread takes every job waiting, runs them in ONE
transaction, commits once, and only then answers them all (if a job fails, the batch is
rolled back and run again one transaction a job, so that one failing job fails alone).
Concurrent executions therefore share their commits (group commit): the cost of a
durable commit is paid once per batch, and `append` still returns only once its event
is committed.

One server per database: the store holds an exclusive lock on a file beside the database
(PATH.lock, flock) while it is open, and a second server opening the same file is
refused. Two servers would each take the other's running executions for crashed ones
and mark them interrupted. The kernel releases the lock when the process dies, even by
kill -9, so the lock never has to be cleaned up.

Durability (journal_mode=WAL):
  synchronous=FULL    (default) the WAL is fsynced at every commit: a committed event
                      survives a kill -9 of the server and a power cut or OS crash.
  synchronous=NORMAL  fsync only at checkpoints: a committed event survives a kill -9
                      of the server (it is in the OS's page cache), but the last
                      commits can be lost in a power cut or OS crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from flowsvc.errors import StoreUnavailableError
from flowsvc.models import Event, FlowFinished, FlowStatus
from flowsvc.store import (
    ExecutionRecord,
    ExecutionSummary,
    NewExecution,
    OnCommit,
    StoredEvent,
    closing_events,
)
from flowsvc.store.codec import (
    KIND_FINISHED,
    dumps,
    event_from_json,
    event_to_json,
    flow_from_json,
)

logger = logging.getLogger("flowsvc.store")

SCHEMA_VERSION = 1

_SCHEMA_V1 = """
CREATE TABLE executions (
    cursor        INTEGER PRIMARY KEY AUTOINCREMENT,  -- creation order
    flow_id       TEXT    NOT NULL UNIQUE,
    flow_name     TEXT    NOT NULL,
    flow_json     TEXT    NOT NULL,
    input_json    TEXT    NOT NULL,
    request_id    TEXT    UNIQUE,                     -- NULL when the client gave none
    request_hash  TEXT    NOT NULL,
    status        TEXT    NOT NULL,
    message       TEXT    NOT NULL DEFAULT '',
    created_at    TEXT    NOT NULL,
    finished_at   TEXT
);
CREATE INDEX executions_by_status ON executions (status, cursor);
CREATE INDEX executions_by_name ON executions (flow_name, cursor);
CREATE INDEX executions_by_finished ON executions (finished_at) WHERE finished_at IS NOT NULL;
CREATE TABLE events (
    flow_id  TEXT    NOT NULL REFERENCES executions (flow_id) ON DELETE CASCADE,
    sequence INTEGER NOT NULL,
    kind     TEXT    NOT NULL,
    body     TEXT    NOT NULL,
    PRIMARY KEY (flow_id, sequence)                   -- never two rows for one event
) WITHOUT ROWID;
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
"""

#: The tables every version of the schema has: a file without them all is not flowsvc's.
FLOWSVC_TABLES = frozenset({"executions", "events", "meta"})

#: Schema migrations: MIGRATIONS[v] takes a database from version v to v + 1.
MIGRATIONS: dict[int, str] = {0: _SCHEMA_V1}

#: Indexes added since the schema's version was set: (name, what creates it). Created at
#: start when missing, with no new version: an index only speeds reads up, and SQLite
#: keeps one up to date for any writer, so a flowsvc from before it still opens the file
#: (a deploy rolled back), where a new version would have been refused.
#: - ListExecutions with both filters (status and flow_name, the operator's "which
#:   onboarding runs failed?") read every execution of that name through
#:   executions_by_name: 30 ms for 100,000 of them (in memory), on the thread every
#:   commit waits for, and again for each page.
ADDED_INDEXES: tuple[tuple[str, str], ...] = (
    (
        "executions_by_name_status",
        "CREATE INDEX IF NOT EXISTS executions_by_name_status"
        " ON executions (flow_name, status, cursor)",
    ),
)

_COLUMNS = (
    "cursor, flow_id, flow_json, input_json, request_id, request_hash, status, message, "
    "created_at, finished_at,"
    " (SELECT COALESCE(MAX(sequence), 0) FROM events e WHERE e.flow_id = executions.flow_id)"
)


def _record(row: tuple[Any, ...]) -> ExecutionRecord:
    (cursor, flow_id, flow_json, input_json, request_id, request_hash, status, message,
     created_at, finished_at, last_sequence) = row  # fmt: skip
    return ExecutionRecord(
        flow_id=flow_id,
        flow=flow_from_json(json.loads(flow_json)),
        input=json.loads(input_json),
        request_id=request_id,
        request_hash=request_hash,
        status=FlowStatus(status),
        message=message,
        created_at=datetime.fromisoformat(created_at),
        finished_at=datetime.fromisoformat(finished_at) if finished_at else None,
        last_sequence=last_sequence,
        cursor=cursor,
    )


@dataclass(slots=True)
class _Job:
    fn: Callable[[sqlite3.Connection], Any] | None  # None: an event append (`row`)
    write: bool
    future: asyncio.Future[Any] | None  # None: an event append (`on_commit`)
    row: tuple[Any, ...] | None = None  # (flow_id, sequence, kind, body)
    finish: tuple[Any, ...] | None = None  # (status, message, finished_at, flow_id)
    event: Event | None = None
    on_commit: OnCommit | None = None
    result: Any = field(default=None)
    error: BaseException | None = field(default=None)


#: The write-ahead log is cut back to this size once checkpointed (SQLite keeps the file,
#: at its largest, otherwise): it grows past it only while a long outside read holds it.
WAL_SIZE_LIMIT = 8 * 1024 * 1024

#: The room the write check asks for: a few pages, about what a small flow's record takes.
_ROOM_CHECK_BYTES = 16 * 1024
#: Room kept, as one row of the meta table, for recording the ends of executions a store
#: failure stopped (their `finished` event, and their record rewritten, which SQLite
#: copies whole): given up only for that, so that a database full of such executions
#: still records them, and retention can then free their room. With a cap, an eighth of
#: it at most. The write check puts it back when there is room for it.
END_RESERVE_BYTES = 64 * 1024
#: Room for an end's event and index entries, beyond its record.
_END_ROOM_BYTES = 16 * 1024

_STOP = object()
#: SQLite's largest INTEGER (a signed 64-bit one).
_MAX_INTEGER = 2**63 - 1

_INSERT_EVENT = "INSERT INTO events (flow_id, sequence, kind, body) VALUES (?, ?, ?, ?)"
_FINISH = (
    "UPDATE executions SET status = ?, message = ?, finished_at = ? WHERE flow_id = ?"
    " AND status = 'running'"
)


class _JobFailed(Exception):
    """A job of a batch failed: the batch is retried job by job."""


def _unavailable(exc: sqlite3.Error) -> StoreUnavailableError:
    return StoreUnavailableError(f"execution store unavailable: {exc}")


class SQLiteStore:
    """ExecutionStore on SQLite; `path` may be ":memory:"."""

    def __init__(
        self,
        path: str,
        *,
        synchronous: str = "FULL",
        busy_timeout_ms: int = 5000,
        max_bytes: int = 0,
        max_batch: int = 512,
    ) -> None:
        if synchronous not in {"FULL", "NORMAL"}:
            raise ValueError("synchronous must be FULL or NORMAL")
        self.path = path
        self._synchronous = synchronous
        self._busy_timeout_ms = busy_timeout_ms
        self._max_bytes = max_bytes
        self._reserve_bytes = (
            min(END_RESERVE_BYTES, max_bytes // 8) if max_bytes else END_RESERVE_BYTES
        )
        #: max_page_count as --db-max-bytes sets it (0: no cap), once the file is open.
        self._cap_pages = 0
        self._max_batch = max_batch
        self._jobs: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        # Executions one of whose events failed to commit (touched by the store thread only).
        self._broken: set[str] = set()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: (device, inode) of the database file as opened: a file removed or replaced
        #: under a running server would take every later commit with it, unseen.
        self._identity: tuple[int, int] | None = None
        #: The same of its write-ahead log, once SQLite has made it (at the first write to
        #: a new database): removed (to free a full disk ...), every later commit went to
        #: the unlinked file, and a kill -9 lost what clients had been told.
        self._wal_identity: tuple[int, int] | None = None
        #: Where SQLite keeps that log: beside the file a symlinked --db points to (a
        #: volume's path), not beside the link, where nothing was ever found.
        self._wal_path = f"{path}-wal"
        self._wal_saved = False
        self._lock_fd: int | None = None
        #: When the batch running now began (time.monotonic()), None while idle.
        self.busy_since: float | None = None
        #: Commits made and jobs served, for the benchmarks' group-commit figures.
        self.commits = 0
        self.jobs = 0

    # -- the worker thread ---------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
        if self.path != ":memory:":
            # Before WAL, which is written in the file's header and lasts: another
            # application's file is refused as it was.
            problem = self._not_flowsvc(conn)
            if problem is not None:
                conn.close()
                raise StoreUnavailableError(problem)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        conn.execute("PRAGMA foreign_keys = ON")
        if self._max_bytes:
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            self._cap_pages = max(1, self._max_bytes // page_size)
            conn.execute(f"PRAGMA max_page_count = {self._cap_pages}")
        return conn

    def _not_flowsvc(self, conn: sqlite3.Connection) -> str | None:
        """Why the file is another application's database (a mistyped --db, a shared
        volume), or None: flowsvc's tables would be added to it."""
        try:
            tables = [
                row[0]
                for row in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table'"
                    " AND name NOT LIKE 'sqlite_%' ORDER BY name"
                )
            ]
        except sqlite3.DatabaseError:
            return None  # damaged: _migrate's check says how
        # Whatever its user_version: other applications set it too (at 1, the file was
        # taken for a flowsvc database, and failed "no such table: executions"). All of
        # flowsvc's tables, as its schema makes them together: "executions" alone is a
        # name other applications use too.
        if not tables or set(tables) >= FLOWSVC_TABLES:
            return None
        shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
        return (
            f"database {self.path} is not a flowsvc database: it has other tables "
            f"({shown}) and no flowsvc schema; give --db a new file or a flowsvc database"
        )

    def _has_room(self, conn: sqlite3.Connection, size: int) -> bool:
        """Whether the cap leaves room for `size` bytes of new rows (with pages to spare):
        a write that finds none fails, and SQLite rolls back its whole transaction."""
        if not self._cap_pages:
            return True  # the disk's room is known only by writing
        page_size, pages, free = (
            conn.execute(f"PRAGMA {name}").fetchone()[0]
            for name in ("page_size", "page_count", "freelist_count")
        )
        return bool(free + max(0, self._cap_pages - pages) >= -(-size // page_size) + 4)

    def _restore_reserve(self, conn: sqlite3.Connection, spare: int) -> None:
        """Put back the reserve for recording ends (given up since, or never made) if
        the cap leaves room for it and `spare` bytes more: a small cap may have none."""
        if not conn.execute(
            "SELECT 1 FROM meta WHERE key = 'end_reserve'"
        ).fetchone() and self._has_room(conn, self._reserve_bytes + spare):
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('end_reserve', zeroblob(?))",
                (self._reserve_bytes,),
            )

    @contextlib.contextmanager
    def _room_for_ends(self, conn: sqlite3.Connection, record_bytes: int) -> Iterator[None]:
        """Inside a job: room to record ends needing `record_bytes` (the largest record,
        rewritten whole, and every end's event).

        The reserve row is given up first (its pages are the ones SQLite takes first).
        With a cap, the cap is lifted for these writes only, by the room the ends need:
        the file grows past the cap only if the reserve and the free pages do not hold
        them, and then by `record_bytes` and _END_ROOM_BYTES at most. The write check
        puts the reserve back later."""
        conn.execute("DELETE FROM meta WHERE key = 'end_reserve'")
        if not self._cap_pages:
            yield
            return
        page_size, pages = (
            conn.execute("PRAGMA page_size").fetchone()[0],
            conn.execute("PRAGMA page_count").fetchone()[0],
        )
        extra = -(-(record_bytes + _END_ROOM_BYTES) // page_size)
        conn.execute(f"PRAGMA max_page_count = {max(self._cap_pages, pages) + extra}")
        try:
            yield
        finally:
            # SQLite keeps it at the file's size if the file grew past the cap.
            conn.execute(f"PRAGMA max_page_count = {self._cap_pages}")

    def _serve(self, conn: sqlite3.Connection) -> None:
        while self._serve_batch(conn):
            pass
        conn.close()

    def _serve_batch(self, conn: sqlite3.Connection) -> bool:
        """Wait for jobs and run those waiting in one batch; False once told to stop.

        A function of its own so that the batch is let go once it has run: kept in the
        loop's variables while the thread waited for the next job, the last batch held its
        jobs' events and callbacks, and through them the last execution's whole history
        in memory (its Run, every event) until the next write came, maybe an hour later."""
        first = self._jobs.get()
        if first is _STOP:
            return False
        batch: list[_Job] = [first]  # type: ignore[list-item]
        while len(batch) < self._max_batch:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is _STOP:
                self._timed_batch(conn, batch)
                return False
            batch.append(job)  # type: ignore[arg-type]
        self._timed_batch(conn, batch)
        return True

    def _timed_batch(self, conn: sqlite3.Connection, batch: list[_Job]) -> None:
        self.busy_since = time.monotonic()
        try:
            self._run_batch(conn, batch)
        finally:
            self.busy_since = None

    def _moved(self) -> str | None:
        """What happened to the database file if it is no longer the one opened."""
        if self._identity is None:
            return None
        try:
            found = os.stat(self.path)
        except OSError as exc:
            return f"the database file {self.path} is gone ({exc.strerror})"
        if (found.st_dev, found.st_ino) != self._identity:
            return f"the database file {self.path} was replaced by another"
        # SQLite keeps the -wal file open, and at its path, while the connection is open.
        wal = self._wal_path
        try:
            found = os.stat(wal)
        except OSError as exc:
            if self._wal_identity is None:
                return None  # not made yet
            return f"the database's write-ahead log {wal} is gone ({exc.strerror})"
        if self._wal_identity is None:
            self._wal_identity = (found.st_dev, found.st_ino)
        elif (found.st_dev, found.st_ino) != self._wal_identity:
            return f"the database's write-ahead log {wal} was replaced by another"
        return None

    def _save_wal(self, conn: sqlite3.Connection) -> None:
        """Once, with the database file still at its path: copy the commits of a removed
        write-ahead log into it, which clients may have been told of. Left in the removed
        file, a kill -9 would lose them (a clean close copies them too)."""
        if self._wal_saved or self._wal_identity is None:
            return
        try:
            found = os.stat(self.path)
        except OSError:
            return
        if (found.st_dev, found.st_ino) != self._identity:
            return
        self._wal_saved = True
        try:
            conn.execute("PRAGMA wal_checkpoint(FULL)")
        except sqlite3.Error as exc:
            logger.warning(
                "commits of the removed write-ahead log not copied into the database",
                extra={"db": self.path, "error": str(exc)},
            )

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Job]) -> None:
        """Run a batch in one transaction and one commit; consecutive appends go in one
        executemany. If a job fails, the batch is rolled back and its jobs are run again
        one transaction each, so that only the failing job fails (the rare path)."""
        try:
            moved = self._moved()  # two stats per batch: a few microseconds
            if moved is not None:
                self._save_wal(conn)
                raise StoreUnavailableError(
                    f"execution store unavailable: {moved} while the server ran; restart "
                    "the server to open a database again"
                )
            self._transaction(conn, batch)
        except _JobFailed:
            for job in batch:
                self._run_alone(conn, job)
        except (sqlite3.Error, StoreUnavailableError) as exc:
            # BEGIN (database locked past busy_timeout) or COMMIT (disk full) failed, or
            # the file is gone: nothing of this batch is committed, so every write fails.
            # A read needs neither: run again on its own, it is answered (it failed "database
            # or disk is full" when it came with a write, and only then).
            error = _unavailable(exc) if isinstance(exc, sqlite3.Error) else exc
            for job in batch:
                if isinstance(exc, sqlite3.Error) and not job.write:
                    self._run_alone(conn, job)
                    continue
                job.error = error
                self._lost(job)
        except Exception as exc:  # a bug: fail the batch, never the store thread
            logger.exception("store batch failed")
            for job in batch:
                job.error = exc
                self._lost(job)
        self.jobs += len(batch)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(_settle, batch)

    def _run_alone(self, conn: sqlite3.Connection, job: _Job) -> None:
        """Run `job` again in a transaction of its own, once its batch failed."""
        job.result = job.error = None
        try:
            self._transaction(conn, [job])
        except _JobFailed:
            self._lost(job)
        except sqlite3.Error as exc:
            job.error = _unavailable(exc)
            self._lost(job)
        except Exception as exc:  # a bug: fail the job, never the store thread
            logger.exception("store job failed")
            job.error = exc
            self._lost(job)

    def _lost(self, job: _Job) -> None:
        """An event was not committed: no later event of its execution may be, or the
        execution would have a hole (pipelined commits queue them before they know)."""
        if job.row is not None:
            self._broken.add(job.row[0])

    def _transaction(self, conn: sqlite3.Connection, batch: list[_Job]) -> None:
        writes = any(job.write for job in batch)
        # A job of several whose write SQLite rolls the whole transaction back for (a row
        # that does not fit under --db-max-bytes: SQLITE_FULL) is run again alone, and the
        # others apart from it: failing the batch stopped every flow with an event in it.
        shared = len(batch) > 1
        try:
            if writes:
                conn.execute("BEGIN IMMEDIATE")
            pending: list[_Job] = []
            for job in batch:
                if job.fn is None:
                    if job.row is not None and job.row[0] in self._broken:
                        job.error = StoreUnavailableError(
                            "execution store unavailable: an earlier event of this "
                            "execution could not be committed"
                        )
                        continue
                    pending.append(job)
                    continue
                if pending:
                    self._append_rows(conn, pending, shared)
                    pending = []
                try:
                    job.result = job.fn(conn)
                except sqlite3.IntegrityError as exc:
                    job.error = exc
                    raise _JobFailed from exc
                except sqlite3.Error as exc:
                    if writes and not conn.in_transaction and not shared:
                        # SQLite rolled the whole transaction back itself (SQLITE_FULL,
                        # SQLITE_IOERR ...) for this job alone: it fails unavailable.
                        raise
                    job.error = _unavailable(exc)
                    raise _JobFailed from exc
                except Exception as exc:
                    job.error = exc
                    raise _JobFailed from exc
            if pending:
                self._append_rows(conn, pending, shared)
            if writes:
                conn.execute("COMMIT")
                self.commits += 1
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @staticmethod
    def _append_rows(conn: sqlite3.Connection, jobs: list[_Job], shared: bool) -> None:
        """Insert the events of `jobs`; `shared`: other jobs are in the transaction."""
        try:
            conn.executemany(_INSERT_EVENT, [job.row for job in jobs if job.row is not None])
            finishes = [job.finish for job in jobs if job.finish is not None]
            if finishes:
                conn.executemany(_FINISH, finishes)
        except (sqlite3.IntegrityError, ValueError) as exc:
            # A duplicate row, or text SQLite cannot take (the engine lets none through):
            # the batch is run again job by job, so that only the culprit fails.
            for job in jobs:
                job.error = exc
            raise _JobFailed from exc
        except sqlite3.Error as exc:
            if not shared:
                raise
            # An event that does not fit (SQLITE_FULL rolls the whole transaction back):
            # run again job by job, the events that fit are committed.
            for job in jobs:
                job.error = _unavailable(exc)
            raise _JobFailed from exc

    def _submit(
        self, fn: Callable[[sqlite3.Connection], Any], *, write: bool
    ) -> asyncio.Future[Any]:
        """Queue `fn` for the store thread; the future is its result (or its error)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self._thread is None or self._loop is None:
            future.set_exception(StoreUnavailableError("execution store is closed"))
        else:
            self._jobs.put(_Job(fn, write, future))
        return future

    async def _call(self, fn: Callable[[sqlite3.Connection], Any], *, write: bool) -> Any:
        return await self._submit(fn, write=write)

    # -- the ExecutionStore API ------------------------------------------------------------

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._lock()
        try:
            conn = await asyncio.to_thread(self._connect)
        except StoreUnavailableError:
            self._unlock()
            raise
        except sqlite3.Error as exc:
            self._unlock()
            raise StoreUnavailableError(f"cannot open database {self.path}: {exc}") from exc
        if self.path != ":memory:":
            found = os.stat(self.path)
            self._identity = (found.st_dev, found.st_ino)
        self._thread = threading.Thread(
            target=self._serve, args=(conn,), name="flowsvc-store", daemon=True
        )
        self._thread.start()
        try:
            created = await self._call(self._migrate, write=True)
            # A job, and a transaction, of its own: if SQLite rolled its transaction back
            # (a full database), it would take nothing else with it.
            await self._call(functools.partial(self._add_indexes, log=not created), write=True)
        except BaseException:
            await self.close()
            raise

    def _lock(self) -> None:
        """Take the database's lock file, or refuse: another server has it open."""
        if self.path == ":memory:":
            return
        lock_path = os.path.realpath(self.path) + ".lock"
        self._wal_path = os.path.realpath(self.path) + "-wal"  # where SQLite makes it
        folder = os.path.dirname(lock_path)
        if not os.path.isdir(folder):
            raise StoreUnavailableError(
                f"cannot open database {self.path}: its directory {folder} does not exist"
            )
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreUnavailableError(f"cannot open database {self.path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise StoreUnavailableError(
                f"database {self.path} is in use by another flowsvc server (it holds "
                f"{lock_path}); one server per database"
            ) from exc
        self._lock_fd = fd
        # The database holds every execution's input and params (an http task's
        # Authorization header ...): a new one is readable by its owner only, and SQLite
        # gives its -wal and -shm files the same mode. An existing file keeps its mode.
        # Made where a symlink points (O_EXCL never follows one: SQLite made the file).
        real_path = os.path.realpath(self.path)
        with contextlib.suppress(OSError):  # exists, or cannot be made: sqlite3 says why
            os.close(os.open(real_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the file releases its lock
            self._lock_fd = None

    def _migrate(self, conn: sqlite3.Connection) -> bool:
        """Check the database and bring its schema up to date; whether it was new."""
        # A damaged file would otherwise serve, healthy, failing every flow and listing
        # with UNAVAILABLE ("database disk image is malformed"), which clients retry. Reads
        # every page once: about 0.35 s for a 320 MB database (200,000 executions).
        try:
            problems = [row[0] for row in conn.execute("PRAGMA quick_check(3)").fetchall()]
        except sqlite3.DatabaseError as exc:  # some damage stops the check itself
            problems = [str(exc)]
        if problems != ["ok"]:
            raise StoreUnavailableError(
                f"database {self.path} is damaged ({'; '.join(problems)}); restore it from "
                "a backup, or salvage what it holds with sqlite3's .recover"
            )
        version: int = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreUnavailableError(
                f"database {self.path} has schema version {version}; this flowsvc knows "
                f"versions up to {SCHEMA_VERSION}"
            )
        tables = (
            [
                row[0]
                for row in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table'"
                    " AND name NOT LIKE 'sqlite_%' ORDER BY name"
                )
            ]
            if version == 0
            else []
        )
        if tables:
            # Tables but no version (another application's were refused by _connect): a
            # restore from sqlite3's .dump, which leaves it out.
            raise StoreUnavailableError(
                f"database {self.path} has flowsvc's tables but no schema version (a restore "
                "from sqlite3's .dump loses it); if a flowsvc of this schema wrote it, run "
                f"sqlite3 {self.path} 'PRAGMA user_version = {SCHEMA_VERSION}'"
            )
        created = version == 0
        while version < SCHEMA_VERSION:
            for statement in MIGRATIONS[version].split(";"):
                if statement.strip():
                    conn.execute(statement)
            version += 1
            conn.execute(f"PRAGMA user_version = {version}")
            logger.info("store schema migrated", extra={"db": self.path, "version": version})
        return created

    def _add_indexes(self, conn: sqlite3.Connection, *, log: bool) -> None:
        """Create the ADDED_INDEXES a database does not have yet (logged, unless the
        database is new: on a large one it takes a moment, once). A database too full for
        one starts without it."""
        present = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")
        }
        for name, statement in ADDED_INDEXES:
            if name in present:
                continue
            started = time.monotonic()
            try:
                conn.execute(statement)
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode != sqlite3.SQLITE_FULL:
                    raise
                logger.warning(
                    "store index not created: the database is full; a later start with "
                    "room creates it (until then the reads it serves are slower)",
                    extra={"db": self.path, "index": name},
                )
                continue
            if log:
                logger.info(
                    "store index created",
                    extra={
                        "db": self.path,
                        "index": name,
                        "seconds": round(time.monotonic() - started, 3),
                    },
                )

    async def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(_STOP)
            thread, self._thread = self._thread, None
            await asyncio.to_thread(thread.join)
        self._unlock()

    def create_nowait(self, new: NewExecution) -> asyncio.Future[ExecutionRecord | None]:
        def create(conn: sqlite3.Connection) -> ExecutionRecord | None:
            if new.request_id is not None:
                row = conn.execute(
                    f"SELECT {_COLUMNS} FROM executions WHERE request_id = ?", (new.request_id,)
                ).fetchone()
                if row is not None:
                    return _record(row)
            conn.execute(
                "INSERT INTO executions (flow_id, flow_name, flow_json, input_json, request_id,"
                " request_hash, status, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    new.flow_id,
                    new.flow.name,
                    new.flow_json,
                    dumps(dict(new.input)),
                    new.request_id,
                    new.request_hash,
                    FlowStatus.RUNNING.value,
                    _ts(new.created_at),
                ),
            )
            return None

        return self._submit(create, write=True)

    def append_nowait(self, flow_id: str, sequence: int, event: Event, on_commit: OnCommit) -> None:
        """Queue one event; `on_commit` is called once its batch is committed (or failed)."""
        if self._thread is None or self._loop is None:
            on_commit(event, StoreUnavailableError("execution store is closed"))
            return
        kind, body = event_to_json(event)
        finish = None
        if kind == KIND_FINISHED:
            assert isinstance(event, FlowFinished)
            finish = (event.status.value, event.message, _ts(event.finished_at), flow_id)
        self._jobs.put(
            _Job(None, True, None, (flow_id, sequence, kind, body), finish, event, on_commit)
        )

    async def get(self, flow_id: str) -> ExecutionRecord | None:
        def get(conn: sqlite3.Connection) -> ExecutionRecord | None:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM executions WHERE flow_id = ?", (flow_id,)
            ).fetchone()
            return _record(row) if row else None

        result: ExecutionRecord | None = await self._call(get, write=False)
        return result

    async def get_by_request_id(self, request_id: str) -> ExecutionRecord | None:
        def get(conn: sqlite3.Connection) -> ExecutionRecord | None:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM executions WHERE request_id = ?", (request_id,)
            ).fetchone()
            return _record(row) if row else None

        result: ExecutionRecord | None = await self._call(get, write=False)
        return result

    async def execution(
        self, flow_id: str, after: int = 0, limit: int | None = None
    ) -> tuple[ExecutionRecord, list[StoredEvent]] | None:
        after = min(after, _MAX_INTEGER)  # a client's uint64; no sequence is larger

        def execution(
            conn: sqlite3.Connection,
        ) -> tuple[ExecutionRecord, list[StoredEvent]] | None:
            # One job: no commit of this store's thread comes between the two reads.
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM executions WHERE flow_id = ?", (flow_id,)
            ).fetchone()
            if row is None:
                return None
            return _record(row), _read_events(conn, flow_id, after, _MAX_INTEGER, limit)

        result: tuple[ExecutionRecord, list[StoredEvent]] | None = await self._call(
            execution, write=False
        )
        return result

    async def events(
        self, flow_id: str, after: int, upto: int, limit: int
    ) -> list[StoredEvent] | None:
        def events(conn: sqlite3.Connection) -> list[StoredEvent] | None:
            if not conn.execute(
                "SELECT 1 FROM executions WHERE flow_id = ?", (flow_id,)
            ).fetchone():
                return None
            return _read_events(conn, flow_id, after, upto, limit)

        result: list[StoredEvent] | None = await self._call(events, write=False)
        return result

    async def page(
        self,
        limit: int,
        before_cursor: int | None,
        status: FlowStatus | None,
        flow_name: str | None,
    ) -> list[ExecutionSummary]:
        sql, args = page_query(limit, before_cursor, status, flow_name)

        def select(conn: sqlite3.Connection) -> list[ExecutionSummary]:
            return [
                ExecutionSummary(
                    flow_id=flow_id,
                    flow_name=flow_name,
                    status=FlowStatus(status),
                    request_id=request_id,
                    created_at=datetime.fromisoformat(created_at),
                    finished_at=datetime.fromisoformat(finished_at) if finished_at else None,
                    cursor=cursor,
                )
                for cursor, flow_id, flow_name, status, request_id, created_at, finished_at in (
                    conn.execute(sql, args).fetchall()
                )
            ]

        result: list[ExecutionSummary] = await self._call(select, write=False)
        return result

    async def finish_running(
        self,
        make_final: Callable[[ExecutionRecord], FlowFinished],
        only: Collection[str] | None = None,
    ) -> list[str]:
        def finish(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM executions WHERE status = ?", (FlowStatus.RUNNING.value,)
            ).fetchall()
            rows = [row for row in rows if only is None or row[1] in only]
            done = []
            ends = []
            for row in rows:
                record = _record(row)
                final = make_final(record)
                ends.append(
                    (
                        record,
                        final,
                        [
                            (sequence, *event_to_json(event), event)
                            for sequence, event in closing_events(record, final)
                        ],
                    )
                )
            # The store may be full: these ends are what the reserve is kept for. Room for
            # the largest record rewritten whole, and for every end's events and message
            # (twice: the pages they fill are not full), however many executions end.
            largest = max((len(row[2].encode()) + len(row[3].encode()) for row in rows), default=0)
            events = sum(
                2
                * (
                    sum(len(body.encode()) for _, _, body, _ in written)
                    + len(final.message.encode())
                    + len(record.flow_id)
                )
                for record, final, written in ends
            )
            with self._room_for_ends(conn, largest + events) if ends else contextlib.nullcontext():
                for record, _, written in ends:
                    for sequence, kind, body, event in written:
                        _insert_event(conn, record.flow_id, sequence, kind, body, event)
                    done.append(record.flow_id)
            # Their drives have ended, and every event they queued was taken before this
            # job: nothing more of theirs comes to be refused. Kept, they piled up with
            # every store failure of a server that runs for weeks.
            self._broken.difference_update(done if only is None else only)
            return done

        result: list[str] = await self._call(finish, write=True)
        return result

    async def delete_finished_before(self, cutoff: datetime, limit: int | None = None) -> int:
        def delete(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "DELETE FROM executions WHERE cursor IN (SELECT cursor FROM executions"
                " WHERE finished_at IS NOT NULL AND finished_at < ? ORDER BY finished_at"
                " LIMIT ?)",
                (_ts(cutoff), -1 if limit is None else limit),
            )
            if cur.rowcount:
                self._restore_reserve(conn, _ROOM_CHECK_BYTES)  # the room freed goes first
            return cur.rowcount

        result: int = await self._call(delete, write=True)
        return result

    async def forget_request_id(self, flow_id: str) -> None:
        def forget(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE executions SET request_id = NULL WHERE flow_id = ?", (flow_id,))

        await self._call(forget, write=True)

    async def check_writable(self) -> None:
        def touch(conn: sqlite3.Connection) -> None:
            self._restore_reserve(conn, _ROOM_CHECK_BYTES)
            # Room for a flow's record, not just for this row rewritten in place (which
            # a full database still takes): pages taken, then given back in the same
            # transaction.
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('room_check', zeroblob(?))",
                (_ROOM_CHECK_BYTES,),
            )
            conn.execute("DELETE FROM meta WHERE key = 'room_check'")
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('last_write_check', ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (datetime.now().isoformat(),),
            )

        await self._call(touch, write=True)

    async def secret(self) -> bytes:
        def secret(conn: sqlite3.Connection) -> bytes:
            row = conn.execute("SELECT value FROM meta WHERE key = 'token_secret'").fetchone()
            if row:
                return bytes(row[0])
            value = os.urandom(32)
            conn.execute("INSERT INTO meta (key, value) VALUES ('token_secret', ?)", (value,))
            return value

        result: bytes = await self._call(secret, write=True)
        return result


#: A read of events stops once their bodies reach this many bytes (after one event at
#: least): results of up to 1 MiB each would otherwise make a job of a few hundred
#: events hold the store's thread, and memory, for hundreds of megabytes.
READ_CHUNK_BYTES = 1024 * 1024


def _read_events(
    conn: sqlite3.Connection, flow_id: str, after: int, upto: int, limit: int | None
) -> list[StoredEvent]:
    """Events of `flow_id` with after < sequence <= upto, in order: at most `limit` (None:
    all), and no more once READ_CHUNK_BYTES of bodies are read (when `limit` is set)."""
    cursor = conn.execute(
        "SELECT sequence, kind, body FROM events WHERE flow_id = ? AND sequence > ?"
        " AND sequence <= ? ORDER BY sequence LIMIT ?",
        (flow_id, after, min(upto, _MAX_INTEGER), -1 if limit is None else limit),
    )
    out: list[StoredEvent] = []
    read = 0
    try:
        for sequence, kind, body in cursor:
            out.append(StoredEvent(sequence, event_from_json(flow_id, kind, body)))
            read += len(body)
            if limit is not None and read >= READ_CHUNK_BYTES:
                break
    finally:
        cursor.close()
    return out


def page_query(
    limit: int, before_cursor: int | None, status: FlowStatus | None, flow_name: str | None
) -> tuple[str, tuple[Any, ...]]:
    """ListExecutions' query and its parameters: newest first, after the page token's
    cursor, with the filters given (each combination has an index: see ADDED_INDEXES)."""
    where: list[str] = ["1 = 1"]
    args: list[Any] = []
    if before_cursor is not None:
        where.append("cursor < ?")
        args.append(before_cursor)
    if status is not None:
        where.append("status = ?")
        args.append(status.value)
    if flow_name is not None:
        where.append("flow_name = ?")
        args.append(flow_name)
    # Only the columns an entry shows: a flow and its input can be large to read and to
    # decode, and this runs on the thread every commit waits for.
    sql = (
        "SELECT cursor, flow_id, flow_name, status, request_id, created_at, finished_at"
        f" FROM executions WHERE {' AND '.join(where)} ORDER BY cursor DESC LIMIT ?"
    )
    return sql, (*args, limit)


def _ts(moment: datetime) -> str:
    """Timestamps in columns compare as text: one fixed format, always UTC."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _insert_event(
    conn: sqlite3.Connection, flow_id: str, sequence: int, kind: str, body: str, event: Event
) -> None:
    conn.execute(_INSERT_EVENT, (flow_id, sequence, kind, body))
    if kind == KIND_FINISHED:
        assert isinstance(event, FlowFinished)
        conn.execute(_FINISH, (event.status.value, event.message, _ts(event.finished_at), flow_id))


def _settle(batch: list[_Job]) -> None:
    """On the loop's thread, once per batch: tell each job's caller how it went."""
    for job in batch:
        if job.on_commit is not None:
            job.on_commit(job.event, job.error)  # type: ignore[arg-type]
            continue
        future = job.future
        if future is None or future.done():  # its caller was cancelled meanwhile
            continue
        if job.error is not None:
            future.set_exception(job.error)
        else:
            future.set_result(job.result)

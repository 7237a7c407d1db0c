"""The conversation index in SQL: SQLite (one host) and PostgreSQL (several replicas).

Both run the same statements, written with ``:name`` parameters; only connecting, the
parameter style and how a process shows it is alive differ:

- SQLite: each process holds an exclusive ``flock`` on a file of its own beside the
  database; the kernel drops it when the process dies, however it dies.
- PostgreSQL: each process holds a session advisory lock on a connection of its own; the
  server drops it when that connection ends, which a killed process's socket does at once.

So a turn claimed by a process that was killed is taken over on the next request, not after
a lease runs out.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import re
import socket
from abc import abstractmethod
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import aiosqlite
import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from chatbot.models.domain import Conversation, utcnow
from chatbot.models.errors import NotFound
from chatbot.persistence.index import ConversationIndex, turn_in_progress

Row = dict[str, Any]

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS conversations (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        title TEXT NOT NULL,
        agent TEXT NOT NULL,
        created_at {time} NOT NULL,
        updated_at {time} NOT NULL,
        turn_owner TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS conversations_by_user "
    "ON conversations (user_id, created_at DESC, id DESC)",
)
_SELECT = "SELECT id, user_id, title, agent, created_at, updated_at, turn_owner FROM conversations"
_MINE = _SELECT + " WHERE id = :id AND user_id = :user"
_NEWEST = " ORDER BY created_at DESC, id DESC LIMIT :limit"
_RECENT = _SELECT + " WHERE user_id = :user" + _NEWEST
_RECENT_AFTER = _SELECT + " WHERE user_id = :user AND (created_at, id) < (:created, :id)" + _NEWEST
_CLAIM_FREE = "UPDATE conversations SET turn_owner = :me WHERE id = :id AND turn_owner IS NULL"
_CLAIM_FROM = "UPDATE conversations SET turn_owner = :me WHERE id = :id AND turn_owner = :holder"

# PostgreSQL advisory locks of this product: (class, key); key 0 serialises schema set-up.
_LOCK_CLASS = 0x4C4D4342


def new_owner_id() -> str:
    """A name for this process, unique across hosts and restarts."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid4().hex[:8]}"


def _owner_key(owner: str) -> int:
    return int.from_bytes(hashlib.blake2b(owner.encode(), digest_size=4).digest()) & 0x7FFFFFFF


class SQLIndex(ConversationIndex):
    def __init__(self, owner: str) -> None:
        self.owner = owner

    # --- what a dialect provides

    @abstractmethod
    async def _rows(self, sql: str, params: Row) -> list[Row]: ...

    @abstractmethod
    async def _execute(self, sql: str, params: Row) -> int:
        """Runs a write; returns the rows it changed."""

    @abstractmethod
    async def _alive(self, owner: str) -> bool:
        """Whether the process named ``owner`` still holds its liveness lock."""

    def _time(self, when: datetime) -> object:
        return when

    # --- the index

    async def _owned(self, user_id: str, conversation_id: str) -> Row:
        rows = await self._rows(_MINE, {"id": conversation_id, "user": user_id})
        if not rows:
            raise NotFound(f"no conversation {conversation_id!r}", code="conversation_not_found")
        return rows[0]

    async def create(self, conversation: Conversation) -> None:
        await self._execute(
            "INSERT INTO conversations (id, user_id, title, agent, created_at, updated_at) "
            "VALUES (:id, :user, :title, :agent, :created, :updated)",
            {
                "id": conversation.id,
                "user": conversation.user_id,
                "title": conversation.title,
                "agent": conversation.agent,
                "created": self._time(conversation.created_at),
                "updated": self._time(conversation.updated_at),
            },
        )

    async def get(self, user_id: str, conversation_id: str) -> Conversation:
        return _conversation(await self._owned(user_id, conversation_id))

    async def recent(
        self, user_id: str, *, limit: int, after: str | None
    ) -> tuple[list[Conversation], bool]:
        params: Row = {"user": user_id, "limit": limit + 1}
        if after is None:
            rows = await self._rows(_RECENT, params)
        else:
            cursor = await self._owned(user_id, after)
            params |= {"created": cursor["created_at"], "id": cursor["id"]}
            rows = await self._rows(_RECENT_AFTER, params)
        return [_conversation(row) for row in rows[:limit]], len(rows) > limit

    async def rename(self, user_id: str, conversation_id: str, title: str) -> Conversation:
        changed = await self._execute(
            "UPDATE conversations SET title = :title, updated_at = :now "
            "WHERE id = :id AND user_id = :user",
            {"title": title, "now": self._time(utcnow()), "id": conversation_id, "user": user_id},
        )
        if not changed:
            raise NotFound(f"no conversation {conversation_id!r}", code="conversation_not_found")
        return await self.get(user_id, conversation_id)

    async def delete(self, user_id: str, conversation_id: str) -> None:
        changed = await self._execute(
            "DELETE FROM conversations WHERE id = :id AND user_id = :user",
            {"id": conversation_id, "user": user_id},
        )
        if not changed:
            raise NotFound(f"no conversation {conversation_id!r}", code="conversation_not_found")

    async def touch(self, user_id: str, conversation_id: str, when: datetime) -> None:
        changed = await self._execute(
            "UPDATE conversations SET updated_at = :when WHERE id = :id AND user_id = :user",
            {"when": self._time(when), "id": conversation_id, "user": user_id},
        )
        if not changed:
            raise NotFound(f"no conversation {conversation_id!r}", code="conversation_not_found")

    async def claim_turn(self, user_id: str, conversation_id: str) -> Conversation:
        row = await self._owned(user_id, conversation_id)
        holder = row["turn_owner"]
        if holder is not None and (holder == self.owner or await self._alive(holder)):
            raise turn_in_progress()
        # Compare-and-set on the holder seen: of two replicas taking it over, one wins.
        taken = await self._execute(
            _CLAIM_FREE if holder is None else _CLAIM_FROM,
            {"me": self.owner, "id": conversation_id, "holder": holder},
        )
        if not taken:
            raise turn_in_progress()
        return _conversation(row)

    async def release_turn(self, conversation_id: str) -> None:
        await self._execute(
            "UPDATE conversations SET turn_owner = NULL WHERE id = :id AND turn_owner = :me",
            {"id": conversation_id, "me": self.owner},
        )


def _conversation(row: Row) -> Conversation:
    return Conversation.model_validate({k: v for k, v in row.items() if k != "turn_owner"})


class SQLiteIndex(SQLIndex):
    """For one host: the processes sharing the file must see the same lock files."""

    def __init__(self, path: Path, owner: str) -> None:
        super().__init__(owner)
        self._path = path
        self._owners = path.with_name(path.name + ".owners")
        self._conn: aiosqlite.Connection | None = None
        self._lock_file: int | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        self._owners.mkdir(parents=True, exist_ok=True)
        self._lock_file = os.open(self._owners / f"{self.owner}.lock", os.O_CREAT | os.O_RDWR)
        fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._conn = await connect_sqlite(self._path)
        for statement in _SCHEMA:
            await self._conn.execute(statement.format(time="TEXT"))
        await self._conn.commit()

    async def aclose(self) -> None:
        if self._conn is not None:
            await self._conn.close()
        if self._lock_file is not None:
            os.close(self._lock_file)
            (self._owners / f"{self.owner}.lock").unlink(missing_ok=True)

    def _db(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise RuntimeError("the index is not open")
        return self._conn

    def _time(self, when: datetime) -> object:
        # Fixed-width text in UTC, so that SQLite's text order is time order.
        return when.astimezone(utcnow().tzinfo).isoformat(timespec="microseconds")

    async def _rows(self, sql: str, params: Row) -> list[Row]:
        async with self._lock, self._db().execute(sql, params) as cursor:
            names = [column[0] for column in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in await cursor.fetchall()]

    async def _execute(self, sql: str, params: Row) -> int:
        async with self._lock:
            cursor = await self._db().execute(sql, params)
            await self._db().commit()
            return cursor.rowcount

    async def _alive(self, owner: str) -> bool:
        path = self._owners / f"{owner}.lock"
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # also drops the lock, if this took it
        path.unlink(missing_ok=True)
        return False


async def connect_sqlite(path: Path) -> aiosqlite.Connection:
    """A connection that waits for other processes' writes instead of failing at once."""
    conn = await aiosqlite.connect(path)
    await conn.execute("PRAGMA journal_mode=WAL")
    await conn.execute("PRAGMA busy_timeout=10000")
    await conn.execute("PRAGMA synchronous=NORMAL")
    return conn


class PostgresIndex(SQLIndex):
    def __init__(self, pool: AsyncConnectionPool[Any], conninfo: str, owner: str) -> None:
        super().__init__(owner)
        self._pool = pool
        self._conninfo = conninfo
        self._liveness: psycopg.AsyncConnection[Any] | None = None

    async def open(self) -> None:
        self._liveness = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
        await self._liveness.execute(
            "SELECT pg_advisory_lock(%s, %s)", (_LOCK_CLASS, _owner_key(self.owner))
        )
        async with self.schema_lock():
            for statement in _SCHEMA:
                await self._execute(statement.format(time="TIMESTAMPTZ"), {})

    def schema_lock(self) -> _SchemaLock:
        """Serialises schema set-up across replicas starting at the same time."""
        if self._liveness is None:
            raise RuntimeError("the index is not open")
        return _SchemaLock(self._liveness)

    async def aclose(self) -> None:
        if self._liveness is not None:
            await self._liveness.close()

    async def _rows(self, sql: str, params: Row) -> list[Row]:
        async with self._pool.connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(_pyformat(sql), params)
            rows: list[Row] = await cursor.fetchall()
            return rows

    async def _execute(self, sql: str, params: Row) -> int:
        async with self._pool.connection() as conn:
            cursor = await conn.execute(_pyformat(sql), params)
            changed: int = cursor.rowcount
            return changed

    async def _alive(self, owner: str) -> bool:
        rows = await self._rows(
            "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND classid::bigint = :class AND objid::bigint = :key AND objsubid = 2",
            {"class": _LOCK_CLASS, "key": _owner_key(owner)},
        )
        return bool(rows)


class _SchemaLock:
    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._conn = conn

    async def __aenter__(self) -> None:
        await self._conn.execute("SELECT pg_advisory_lock(%s, 0)", (_LOCK_CLASS,))

    async def __aexit__(self, *exc: object) -> None:
        await self._conn.execute("SELECT pg_advisory_unlock(%s, 0)", (_LOCK_CLASS,))


_NAMED = re.compile(r":([a-z]+)\b")


def _pyformat(sql: str) -> str:
    """``:name`` to psycopg's ``%(name)s`` (``::`` casts are left alone)."""
    return _NAMED.sub(lambda m: f"%({m.group(1)})s", re.sub(r"::", "\0", sql)).replace("\0", "::")

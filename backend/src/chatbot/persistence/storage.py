"""Where conversations live, chosen by ``CHATBOT_STORE_URL``: the conversation index and the
agents' checkpointer, always side by side in the same database.

The checkpointer reads checkpoints back with the ``serde`` it is given: the agents' own,
which rebuilds only their state's types (this package knows nothing of them).

- ``memory://`` (the default): this process only; gone at exit.
- ``sqlite:///path/to/chatbot.db``: durable on one host; processes on that host may share it.
- ``postgresql://user:password@host/db``: durable and shared by any number of API replicas.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from langgraph.checkpoint.serde.base import SerializerProtocol
from psycopg import AsyncConnection
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool

from chatbot.models.errors import ConfigurationError
from chatbot.persistence.checkpoints import PrunedInMemorySaver, PrunedSqliteSaver
from chatbot.persistence.index import ConversationIndex, MemoryIndex
from chatbot.persistence.sql import (
    PostgresIndex,
    SQLiteIndex,
    connect_sqlite,
    new_owner_id,
)

SCHEMES = ("memory", "sqlite", "postgresql", "postgres")


@dataclass(frozen=True, slots=True)
class Storage:
    index: ConversationIndex
    checkpointer: BaseCheckpointSaver[Any]
    kind: str


def sqlite_path(url: str) -> Path:
    """``sqlite:///relative.db`` or ``sqlite:////absolute.db``, as SQLAlchemy reads them."""
    path = url.removeprefix("sqlite:///")
    if not path or path == url:
        raise ConfigurationError(f"a SQLite store URL looks like sqlite:///chatbot.db, not {url!r}")
    return Path(path)


@asynccontextmanager
async def open_storage(
    url: str, *, serde: SerializerProtocol, pool_size: int = 20
) -> AsyncIterator[Storage]:
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        yield Storage(MemoryIndex(), PrunedInMemorySaver(serde=serde), scheme)
    elif scheme == "sqlite":
        async with _sqlite(sqlite_path(url), serde) as storage:
            yield storage
    elif scheme in ("postgresql", "postgres"):
        async with _postgres(url, pool_size, serde) as storage:
            yield storage
    else:
        raise ConfigurationError(
            f"CHATBOT_STORE_URL {url!r}: the scheme must be one of {', '.join(SCHEMES)}"
        )


@asynccontextmanager
async def _sqlite(path: Path, serde: SerializerProtocol) -> AsyncIterator[Storage]:
    path.parent.mkdir(parents=True, exist_ok=True)
    index = SQLiteIndex(path, new_owner_id())
    await index.open()
    try:
        conn = await connect_sqlite(path)
        try:
            saver = PrunedSqliteSaver(conn, serde=serde)
            await saver.setup()
            yield Storage(index, saver, "sqlite")
        finally:
            await conn.close()
    finally:
        await index.aclose()


@asynccontextmanager
async def _postgres(url: str, pool_size: int, serde: SerializerProtocol) -> AsyncIterator[Storage]:
    pool: AsyncConnectionPool[AsyncConnection[DictRow]] = AsyncConnectionPool(
        url,
        min_size=1,
        max_size=pool_size,
        open=False,
        # What LangGraph's PostgreSQL saver needs of its connections.
        kwargs={"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row},
    )
    async with pool:
        await pool.wait()
        index = PostgresIndex(pool, url, new_owner_id())
        await index.open()
        try:
            saver = AsyncPostgresSaver(pool, serde=serde)
            async with index.schema_lock():
                await saver.setup()
            yield Storage(index, saver, "postgresql")
        finally:
            await index.aclose()

"""LangGraph checkpointers that keep one checkpoint per conversation.

A turn writes several checkpoints, and every one of them holds (or points at a version of)
the whole message list, so history that is kept grows with the square of a conversation's
length. A conversation's state is its latest checkpoint alone, so after each turn the rest
is pruned through LangGraph's own ``aprune(..., strategy="keep_latest")``: PostgreSQL's
saver has it; these add it to the in-memory and SQLite savers, which lack it. (The graph
has no ``DeltaChannel``, whose history a keep-latest prune would cut.)
"""

from __future__ import annotations

from collections.abc import Sequence

from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver


def _keep_latest_only(strategy: str) -> None:
    if strategy != "keep_latest":
        raise ValueError(f"unsupported prune strategy {strategy!r}")


class PrunedInMemorySaver(InMemorySaver):
    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        _keep_latest_only(strategy)
        for thread_id in thread_ids:
            for ns, checkpoints in self.storage.get(thread_id, {}).items():
                if not checkpoints:
                    continue
                latest = max(checkpoints)
                saved, metadata, _parent = checkpoints[latest]
                versions = self.serde.loads_typed(saved)["channel_versions"]
                # Only this thread's keys are visited (a scan of every write and blob would
                # cost each turn time in proportion to all conversations): its writes are
                # keyed by its checkpoints, and every blob it holds is a channel version
                # that one of its checkpoints names.
                for checkpoint_id, (old, _meta, _parent) in checkpoints.items():
                    if checkpoint_id == latest:
                        continue
                    self.writes.pop((thread_id, ns, checkpoint_id), None)
                    named = self.serde.loads_typed(old)["channel_versions"]
                    for channel, version in named.items():
                        if versions.get(channel) != version:
                            self.blobs.pop((thread_id, ns, channel, version), None)
                # The kept one becomes a root: its parent is gone.
                checkpoints.clear()
                checkpoints[latest] = (saved, metadata, None)


class PrunedSqliteSaver(AsyncSqliteSaver):
    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        _keep_latest_only(strategy)
        async with self.lock:
            for thread_id in thread_ids:
                # Checkpoint ids are time-ordered (uuid6); SQLite saves whole states, so the
                # latest row needs no other.
                for table in ("writes", "checkpoints"):
                    await self.conn.execute(
                        f"DELETE FROM {table} WHERE thread_id = ? AND checkpoint_id < ("  # noqa: S608
                        "SELECT max(checkpoint_id) FROM checkpoints c "
                        f"WHERE c.thread_id = ? AND c.checkpoint_ns = {table}.checkpoint_ns)",
                        (thread_id, thread_id),
                    )
                await self.conn.execute(
                    "UPDATE checkpoints SET parent_checkpoint_id = NULL WHERE thread_id = ?",
                    (thread_id,),
                )
            await self.conn.commit()

"""What outlives a request: the conversation index and the agents' checkpoints.

- ``index``: ``ConversationIndex``, the interface (owner, title, agent, times, turn claims),
  and ``MemoryIndex``, the in-memory one.
- ``sql``: ``SQLiteIndex`` and ``PostgresIndex``, the same index in SQL.
- ``checkpoints``: LangGraph checkpointers that keep one checkpoint per conversation.
- ``storage``: ``open_storage``, which opens an index and a checkpointer side by side in the
  database ``CHATBOT_STORE_URL`` names, as one ``Storage``.

It uses nothing of the services, agents or API above it.
"""

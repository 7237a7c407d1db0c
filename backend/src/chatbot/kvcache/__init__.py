"""The embedded engine's tiered KV-state cache (the LMCache idea on a CPU)."""

from chatbot.kvcache.keys import PromptKey, owner_digest
from chatbot.kvcache.store import KVCache, Restore, Reuse, SequenceState

__all__ = ["KVCache", "PromptKey", "Restore", "Reuse", "SequenceState", "owner_digest"]

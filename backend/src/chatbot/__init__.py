"""lmcache-chatbot: a chatbot backend that reuses the KV cache of what the model has read."""

__version__ = "0.1.0"

"""Metrics and logging, used by every layer and using none of them."""

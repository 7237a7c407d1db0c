"""Engines: one protocol (``base``), several implementations, picked by name in ``factory``."""

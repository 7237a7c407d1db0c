"""Conversation and turn lifecycle, stores and limits: what the API's routes call."""

"""Conversation and turn lifecycle, and limits: what the API's routes call."""

"""Continuous batching for the embedded engine: every user served at once from one llama.cpp
context, one bounded step at a time.

- ``requests``: a request as asked, and its progress;
- ``scheduler``: the policy, as plain data in and out: ``schedule()`` plans a step,
  ``update_from_output()`` applies its results;
- ``cost``: what a step costs, fitted from the steps it times, so that steps stay bounded;
- ``runner``: carries a plan out on llama.cpp, on the worker thread.
"""

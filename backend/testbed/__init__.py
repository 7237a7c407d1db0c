"""The servers that the tests and the benchmarks both start, in one place that neither owns.

- ``process``: ``ServerProcess``, a command run as a server process of its own;
- ``servers``: ``Target``, a running server as a client sees it, and llama-cpp-python's
  OpenAI-compatible server;
- ``llama_server``: llama.cpp's own server, built from the llama.cpp the product vendors;
- ``vllm_stack``: vLLM's CPU build, LMCache's multi-process server and vLLM's router.

Why a package of its own: the tests must not depend on the benchmarks (nor the benchmarks on
the tests), and the product's wheel must not ship launchers that only they use. It imports
the product (``chatbot``), never ``tests`` or ``benchmarks``; it runs from the source tree
(``backend/``), as they do, and is not part of the wheel.
"""

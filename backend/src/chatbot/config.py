"""The one validated configuration object, read from ``CHATBOT_*`` variables and ``.env``.

It is read once at start-up (``Settings()``) and passed down; nothing else reads the
environment. Unsafe or inconsistent values refuse to start instead of falling back.
"""

from __future__ import annotations

import ipaddress
from enum import StrEnum
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AliasChoices, ByteSize, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LOCAL_USER = "local"


class RouterKind(StrEnum):
    """How the agent of an ``auto`` conversation's turn is chosen."""

    RULES = "rules"  # deterministic rules over the message and the conversation: no model call
    LLM = "llm"  # the model picks, behind a routing prompt that is a shared, cached prefix


class EngineKind(StrEnum):
    """The engines a server can run; the values are the CLI and ``CHATBOT_ENGINE`` choices."""

    EMBEDDED = "embedded"  # llama.cpp in this process, on the CPU
    OPENAI = "openai"  # any OpenAI-compatible server: vLLM with LMCache in production
    # A timing model of a vLLM + LMCache GPU replica, for load tests of the API tier and
    # capacity planning only: never a default, never the source of a cache or TTFT claim.
    SIMULATED = "simulated"


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "lmcache-chatbot"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _origin(value: str) -> str:
    """A browser origin, 'scheme://host[:port]', lower-cased as browsers send it."""
    parsed = urlsplit(value)
    if (
        parsed.scheme not in ("http", "https")
        or not parsed.hostname
        or parsed.username is not None
        or value.rstrip("/") != f"{parsed.scheme}://{parsed.netloc}"
    ):
        raise ValueError(
            f"CHATBOT_CORS_ORIGINS: {value!r} is not an origin like 'https://chat.example.com' "
            "(scheme and host, an optional port, no path)"
        )
    return f"{parsed.scheme}://{parsed.netloc}".lower()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CHATBOT_",
        env_file=".env",
        extra="ignore",
        frozen=True,
        populate_by_name=True,
    )

    # --- server
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    api_keys: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        repr=False,
        description="Bearer keys mapped to user names: 'key1=alice,key2=bob'. "
        "Empty: one local user, loopback only.",
    )
    operators: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Users (names from CHATBOT_API_KEYS) who see the whole KV cache's "
        "counters on /v1/cache/stats, all users' together: 'alice,ops'. Others see their "
        "own only. Keyless, the local user is the operator.",
    )
    metrics_token: str | None = Field(
        default=None,
        repr=False,
        min_length=16,
        description="Bearer token /metrics requires ('Authorization: Bearer <token>'); "
        "unset: /metrics answers loopback clients only.",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Browser origins allowed to call the API from another site, exact "
        "('https://chat.example.com,http://localhost:3000'). Empty: no CORS headers at all; "
        "'*' is refused.",
    )

    # --- engine
    engine: EngineKind = EngineKind.EMBEDDED
    model_path: Path | None = Field(
        default=None, description="Any GGUF file; unset: the bundled Gemma 3 270M Q4_K_M."
    )
    model_id: str = Field(
        default="", description="Model name served on /v1/models; default: the GGUF file's stem."
    )
    cache_dir: Path = Field(default_factory=_default_cache_dir)
    context_tokens: int = Field(default=8192, ge=512, le=131072)
    batch_tokens: int = Field(
        default=512,
        ge=32,
        le=8192,
        description="Tokens the embedded engine evaluates per step: one for each answering "
        "sequence, the rest for prompt chunks of those being admitted.",
    )
    step_bound_ms: float = Field(
        default=150,
        ge=10,
        le=10000,
        description="The most the embedded engine's questions', answers' and reads' steps of "
        "one turn may cost together, predicted from their tokens and positions: a long prompt "
        "is read in chunks that fit, so that others' next tokens never wait longer. A prompt "
        "alone on the engine may take steps of four times it.",
    )
    side_read: bool = Field(
        default=True,
        description="On a machine of two cores or more, a long prompt (2,048 tokens or more "
        "to read) that arrives while others are answered is read by a second llama.cpp "
        "context on a core of its own, and its KV handed to its sequence: the answers keep "
        "the other core.",
    )
    parallel: int = Field(
        default=16,
        ge=1,
        le=64,
        description="Requests the embedded engine answers at once, each on its own sequence "
        "of one llama.cpp context (continuous batching); more wait in its queue.",
    )
    kv_pool_tokens: int = Field(
        default=16384,
        ge=512,
        le=1048576,
        description="KV cells of the embedded engine's context, shared by all its sequences "
        "(about 18 KiB each for the bundled model); at least CONTEXT_TOKENS.",
    )
    threads: int | None = Field(
        default=None,
        ge=1,
        description="Threads computing each step of the embedded engine. Unset: one per core "
        "while the machine is otherwise quiet, fewer while other work keeps cores busy (on 2 "
        "cores beside a busy process, 2 threads made decode steps 7x slower at p90 than 1).",
    )
    prefix_cache: bool = Field(
        default=True,
        description="Reuse the KV cache of the longest common prompt prefix; off: the "
        "baseline that recomputes every prompt (for benchmarks).",
    )
    few_shot: bool = Field(
        default=True,
        description="Prefix prompts with a few-shot chat preamble (needed by base models).",
    )
    chat_template: str = Field(
        default="auto",
        description="How prompts are laid out: 'auto' (the GGUF's own chat template if it "
        "has one, else the transcript), 'transcript' (plain User:/Assistant: turns with "
        "few-shot examples, for a base model), 'model' (the model's own template; with the "
        "openai engine: the server renders it, and no transcript stops are sent), or a path "
        "to a .jinja template.",
    )

    # --- the openai engine: an OpenAI-compatible model server
    openai_base_url: str | None = Field(
        default=None,
        description="The server's OpenAI API, e.g. 'http://vllm:8000/v1'; required by "
        "CHATBOT_ENGINE=openai.",
    )
    openai_api_key: str | None = Field(default=None, repr=False)
    openai_model: str = Field(
        default="", description="The model the server serves; empty: the first it lists."
    )
    openai_affinity_header: str = Field(
        default="x-session-id",
        pattern=r"^[A-Za-z0-9-]+$",
        description="Header carrying a stable per-conversation key, for a router with "
        "session affinity (vLLM production-stack: routingLogic 'session', the same "
        "sessionKey).",
    )
    openai_max_connections: int = Field(
        default=512, ge=1, description="Connections to the server: streams in flight."
    )
    openai_connect_timeout: float = Field(default=3.0, gt=0)
    openai_read_timeout: float = Field(
        default=120.0,
        gt=0,
        description="Longest wait for the server's next chunk, the first token included.",
    )
    openai_retries: int = Field(
        default=2,
        ge=0,
        le=10,
        description="Retries of a request the server did not take (unreachable, 502-504, "
        "a router's 500 that could not reach its replica), "
        "never of one whose answer has started.",
    )

    # --- the simulated engine: load tests and capacity planning only (engines/simulated.py,
    # whose GpuModel holds the figures behind these defaults)
    simulated_decode_tokens_per_s: float = Field(
        default=40.0,
        gt=0,
        le=10_000,
        description="Tokens a second each stream is answered at (a loaded H100 replica).",
    )
    simulated_prefill_us_per_token: float = Field(
        default=31.22,
        ge=0,
        description="Prefill cost of an uncached prompt token, attention aside (H100, 8B).",
    )
    simulated_load_us_per_token: float = Field(
        default=2.43,
        ge=0,
        description="Copying one cached token's KV from CPU RAM to the GPU (128 KiB at 54 GB/s).",
    )
    simulated_max_sequences: int = Field(
        default=256,
        ge=1,
        description="Sequences generated at once (vLLM's --max-num-seqs); more wait in the "
        "queue. A load test of the API tier sets it above its users.",
    )
    simulated_answer_tokens: int = Field(
        default=200, ge=1, description="Tokens of every answer, unless max_tokens cuts it."
    )
    simulated_gpu_cache_tokens: int | None = Field(
        default=None,
        ge=0,
        description="Tokens of KV the GPU prefix cache holds; default: one H100's (~412k).",
    )
    simulated_cpu_cache_tokens: int | None = Field(
        default=None,
        ge=0,
        description="Tokens of KV LMCache holds in CPU RAM; default: 64 GiB's (512k).",
    )

    # --- the embedded engine's KV-state cache (used when prefix_cache is on)
    kv_chunk_tokens: int = Field(
        default=64,
        ge=1,
        le=4096,
        description="Tokens per hashed prompt chunk: the granularity at which saved states "
        "are found (LMCache uses 256 for GPU-sized prompts).",
    )
    kv_ram_bytes: ByteSize = Field(
        default=ByteSize(2 * 1024**3),
        description="RAM for saved KV states, e.g. '2GiB'; 0: the live context only.",
    )
    kv_disk_bytes: ByteSize = Field(
        default=ByteSize(8 * 1024**3),
        description="Disk for KV states evicted from RAM, e.g. '8GiB'; 0: no disk tier.",
    )
    kv_dir: Path | None = Field(
        default=None, description="Where the disk tier lives; default: CACHE_DIR/kv."
    )

    # --- generation defaults
    system_prompt: str = (
        "You are a helpful, concise assistant. Answer the user's question directly."
    )
    max_tokens: int = Field(default=256, ge=1)
    max_tokens_limit: int = Field(default=2048, ge=1)
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)

    # --- agents
    router: RouterKind = RouterKind.RULES
    docs_dir: Path | None = Field(
        default=None,
        description="Folder of .md/.txt documents the knowledge agent answers from; "
        "default: the bundled product documentation.",
    )
    docs_max_chars: int = Field(
        default=16_000,
        ge=0,
        description="Most characters of documents placed in the shared prompt prefix; "
        "more refuses to start (they would crowd the context window out).",
    )
    compact_at: float = Field(
        default=0.75,
        gt=0.1,
        le=1.0,
        description="Share of the context window at which a conversation's oldest turns are "
        "summarised into a new stable prefix.",
    )
    compact_keep_messages: int = Field(
        default=4, ge=0, description="Most recent messages a compaction keeps word for word."
    )

    # --- tracing: Langfuse's own variables, so its documentation applies as written
    langfuse_public_key: str | None = Field(
        default=None, validation_alias="LANGFUSE_PUBLIC_KEY", repr=False
    )
    langfuse_secret_key: str | None = Field(
        default=None, validation_alias="LANGFUSE_SECRET_KEY", repr=False
    )
    langfuse_base_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("LANGFUSE_BASE_URL", "LANGFUSE_HOST"),
        description="The Langfuse server; unset: Langfuse Cloud.",
    )

    # --- storage
    store_url: str = Field(
        default="memory://",
        description="Where conversations live: 'memory://' (this process), "
        "'sqlite:///path/chatbot.db' (durable, one host) or "
        "'postgresql://user:password@host/db' (durable, shared by replicas).",
        repr=False,
    )
    store_pool_size: int = Field(
        default=20, ge=1, description="PostgreSQL connections per API process."
    )

    # --- limits
    queue_size: int = Field(default=32, ge=0, description="Requests waiting for the engine.")
    max_streams_per_user: int = Field(default=4, ge=1)
    max_streams: int = Field(
        default=10_000, ge=1, description="Answers generated at once, all users together."
    )
    requests_per_minute: int = Field(
        default=120, ge=1, description="Requests per user per minute, in bursts of as many."
    )
    tokens_per_minute: int = Field(
        default=200_000,
        ge=1,
        description="Tokens the engine may compute for one user per minute, in bursts of as "
        "many: prompt tokens not served from the cache, tokens generated, and what drafts "
        "read. Past it, answers get 429 token_budget_exhausted and drafts are skipped.",
    )
    drafts: bool = Field(
        default=True,
        description="Read ahead what users are writing (PUT /v1/conversations/{id}/draft); "
        "false: every draft is answered as skipped (disabled) and nothing is computed.",
    )
    max_drafts_per_user: int = Field(
        default=2,
        ge=1,
        le=64,
        description="Conversations of one user whose drafts the engine may hold at once; a "
        "draft in one more drops the user's oldest.",
    )
    max_message_chars: int = Field(default=32_000, ge=1)
    max_conversation_messages: int = Field(
        default=1000, ge=2, description="Messages a conversation may hold, answers included."
    )
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    shed_accept_queue: int = Field(
        default=128,
        ge=0,
        description="When this many connections wait in the kernel's accept queue (the "
        "process is not keeping up), new answers are refused at once with 503 "
        "server_overloaded and Retry-After; 0: never.",
    )
    stream_interval_ms: float = Field(
        default=0.0,
        ge=0,
        le=1000,
        description="Tokens that follow one another within this long go out as one "
        "streamed delta (the first at once): fewer events for a busy API tier to pass on "
        "and write; 0: every token as it comes.",
    )
    drain_seconds: int = Field(
        default=30,
        ge=0,
        description="On SIGTERM, how long answers being streamed may take to finish "
        "before they are stopped (stored as far as they got, and each open stream ends "
        "with an error event 'server_shutting_down').",
    )
    max_header_bytes: int = Field(
        default=16_384,
        ge=1024,
        le=1_048_576,
        description="Request line and headers together; past it 431 and the connection is closed.",
    )
    receive_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        le=600,
        description="A request's headers and body must arrive within this long of its "
        "first byte (of the connection's opening, for its first request); past it 408 and "
        "the connection is closed. The keep-alive timeout between requests is uvicorn's (5 s).",
    )
    max_connections: int = Field(
        default=0,
        ge=0,
        description="Open connections one process holds; a request on one past it gets "
        "503 too_many_connections with Retry-After. 0: the open-files limit less 256.",
    )
    sse_keepalive_seconds: float = Field(
        default=15.0,
        ge=0,
        le=3600,
        description="A stream that has sent nothing for this long (an answer queued or in "
        "a long prefill) gets an SSE comment line, so that proxies do not cut it; 0: never.",
    )

    log_level: str = "info"

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_api_keys(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        keys: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in value.split(","))):
            key, sep, user = item.partition("=")
            key, user = key.strip(), user.strip()
            if not sep or not key or not user:
                raise ValueError("CHATBOT_API_KEYS must look like 'key1=alice,key2=bob'")
            if len(key) < 16:
                raise ValueError(f"the API key of user {user!r} is shorter than 16 characters")
            if key in keys:
                raise ValueError(f"an API key is given twice (users {keys[key]!r}, {user!r})")
            keys[key] = user
        return keys

    @field_validator("chat_template")
    @classmethod
    def _check_chat_template(cls, value: str) -> str:
        if value in ("auto", "transcript", "model"):
            return value
        if not value.endswith(".jinja") or not Path(value).is_file():
            raise ValueError(
                f"CHATBOT_CHAT_TEMPLATE: {value!r} is neither 'auto', 'transcript', 'model' "
                "nor an existing .jinja file"
            )
        return value

    @field_validator("operators", mode="before")
    @classmethod
    def _parse_operators(cls, value: object) -> object:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _parse_cors_origins(cls, value: object) -> object:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            return value
        origins: list[str] = []
        for item in (str(part).strip() for part in items):
            if not item:
                continue
            origin = item if item == "*" else _origin(item)
            if origin not in origins:
                origins.append(origin)
        return origins

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> Settings:
        if "*" in self.cors_origins:
            # Without keys, any web site's scripts would act as the local user; with keys,
            # any site could drive a key a user pasted into it. Origins are named.
            raise ValueError(
                "CHATBOT_CORS_ORIGINS='*' is refused: scripts of any web site could then "
                "call the API and read its answers; list the exact origins instead"
            )
        if not self.api_keys and not _is_loopback(self.host):
            raise ValueError(
                f"refusing to listen on {self.host} without CHATBOT_API_KEYS: "
                "the keyless local mode binds to loopback only"
            )
        unknown = set(self.operators) - set(self.api_keys.values())
        if self.api_keys and unknown:
            raise ValueError(
                f"CHATBOT_OPERATORS names users no key in CHATBOT_API_KEYS has: {sorted(unknown)}"
            )
        if self.max_tokens > self.max_tokens_limit:
            raise ValueError("CHATBOT_MAX_TOKENS exceeds CHATBOT_MAX_TOKENS_LIMIT")
        if self.kv_pool_tokens < self.context_tokens:
            raise ValueError(
                "CHATBOT_KV_POOL_TOKENS must be at least CHATBOT_CONTEXT_TOKENS: the pool "
                "holds every sequence, one of them as long as the context"
            )
        if self.docs_dir is not None and not self.docs_dir.is_dir():
            raise ValueError(f"CHATBOT_DOCS_DIR {self.docs_dir} is not a folder")
        if bool(self.langfuse_public_key) != bool(self.langfuse_secret_key):
            raise ValueError("set both LANGFUSE_PUBLIC_KEY and LANGFUSE_SECRET_KEY, or neither")
        if self.engine is EngineKind.OPENAI and not self.openai_base_url:
            raise ValueError("CHATBOT_ENGINE=openai needs CHATBOT_OPENAI_BASE_URL")
        if self.openai_base_url and not self.openai_base_url.startswith(("http://", "https://")):
            raise ValueError("CHATBOT_OPENAI_BASE_URL must start with http:// or https://")
        scheme, _, rest = self.store_url.partition("://")
        if scheme not in ("memory", "sqlite", "postgresql", "postgres") or (
            scheme == "sqlite" and not rest.removeprefix("/")
        ):
            raise ValueError(
                "CHATBOT_STORE_URL must be memory://, sqlite:///path/chatbot.db or "
                "postgresql://user:password@host/db"
            )
        if self.model_path is not None and not self.model_path.is_file():
            raise ValueError(f"CHATBOT_MODEL_PATH {self.model_path} is not a file")
        return self

    @property
    def kv_folder(self) -> Path:
        return self.kv_dir if self.kv_dir is not None else self.cache_dir / "kv"

    def is_operator(self, user: str) -> bool:
        """Keyless, the one local user runs the server."""
        return not self.api_keys or user in self.operators

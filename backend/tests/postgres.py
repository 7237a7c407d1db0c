"""A throwaway PostgreSQL server for the tests: Debian's own binaries (``make test`` installs
them), a fresh cluster in a temporary folder, on a free loopback port."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from chatbot.client.local_server import free_port


def _bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL's server is not installed: run `make postgresql`")
    return Path(found[-1]).parent


def _as_owner(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run it as the 'postgres' user then."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yields the URL of an empty database on a new cluster; stops and removes it after."""
    bin_dir = _bin_dir()
    root = Path(tempfile.mkdtemp(prefix="chatbot-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    port = free_port()
    initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", "chatbot", "-A", "trust"]
    subprocess.run(_as_owner([*initdb, "--no-sync"]), check=True, capture_output=True)
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    start = [str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log")]
    subprocess.run(_as_owner([*start, "-w", "start"]), check=True, capture_output=True)
    try:
        with psycopg.connect(
            f"postgresql://chatbot@127.0.0.1:{port}/postgres", autocommit=True
        ) as admin:
            admin.execute("CREATE DATABASE chatbot")
        yield f"postgresql://chatbot@127.0.0.1:{port}/chatbot"
    finally:
        subprocess.run(
            _as_owner([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
            check=False,
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)


def fresh_database(url: str) -> str:
    """A new empty database on the same server, so tests do not see each other's rows."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    server, _, _ = url.rpartition("/")
    with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")  # a generated identifier, not input
    return f"{server}/{name}"

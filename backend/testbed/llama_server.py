"""llama.cpp's own server, the peer a CPU user would pick instead of the chatbot.

It is built once into the cache directory from the very llama.cpp that the pinned
llama-cpp-python vendors (its source distribution's ``vendor/llama.cpp``), so both run the
same kernels on the same GGUF; ``--llama-server PATH`` uses another build. About ten
minutes on two cores, the first time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import llama_cpp

from chatbot.client.local_server import free_port
from testbed.servers import MODEL_ID, Target, peer_server


def binary_path(cache_dir: Path) -> Path:
    return cache_dir / "llama-server" / f"llama-cpp-python-{llama_cpp.__version__}" / "llama-server"


def ensure_binary(cache_dir: Path) -> Path:
    """The llama-server binary, built first if the cache directory lacks it."""
    target = binary_path(cache_dir)
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="llama-server-build-") as work:
        folder = Path(work)
        print(f"building llama-server from llama-cpp-python {llama_cpp.__version__} ...")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"llama-cpp-python=={llama_cpp.__version__}",
                "-d",
                str(folder),
            ],
            check=True,
        )
        archive = next(folder.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(archive) as tar:
            tar.extractall(folder, filter="data")
        source = next(folder.glob("llama_cpp_python-*/vendor/llama.cpp"))
        build = folder / "build"
        subprocess.run(
            [
                "cmake",
                "-S",
                str(source),
                "-B",
                str(build),
                "-DCMAKE_BUILD_TYPE=Release",
                "-DBUILD_SHARED_LIBS=OFF",
                "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_BUILD_EXAMPLES=OFF",
                # Nothing is fetched at build or run time: no web UI, no HTTPS client.
                "-DLLAMA_BUILD_UI=OFF",
                "-DLLAMA_USE_PREBUILT_UI=OFF",
                "-DLLAMA_OPENSSL=OFF",
            ],
            check=True,
        )
        subprocess.run(
            [
                "cmake",
                "--build",
                str(build),
                "--target",
                "llama-server",
                "-j",
                str(os.cpu_count() or 1),
            ],
            check=True,
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(next(build.glob("bin/llama-server")), target)
    return target


@contextmanager
def llama_server(
    name: str,
    *,
    binary: Path,
    users: int,
    model_path: Path,
    parallel: int,
    cache_ram_mib: int | None,
    context_tokens: int = 4096,
    extra: tuple[str, ...] = (),
) -> Iterator[Target]:
    """``llama-server --parallel N``, each slot ``context_tokens`` long (it sizes its KV
    as N slots of that, so a slot is kept to what a conversation of the workloads needs);
    ``cache_ram_mib``: its host-RAM prompt cache (``--cache-ram``), None for none."""
    port = free_port()
    threads = str(os.cpu_count() or 1)
    command = [
        str(binary),
        "--model",
        str(model_path),
        "--alias",
        MODEL_ID,
        "--ctx-size",
        str(context_tokens * parallel),
        "--parallel",
        str(parallel),
        "--threads",
        threads,
        "--threads-batch",
        threads,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        # The same KV layout as the chatbot's (a full-size sliding-window cache), so that
        # a slot can go back to a shared prefix as ours does.
        "--swa-full",
        "--cache-ram",
        str(cache_ram_mib if cache_ram_mib is not None else 0),
        "--no-webui",
        "--log-disable",
        *extra,
    ]
    url = f"http://127.0.0.1:{port}"
    notes = {
        "parallel": parallel,
        "cache_ram_mib": cache_ram_mib or 0,
        "extra": " ".join(extra),
        "llama_cpp": f"vendored by llama-cpp-python {llama_cpp.__version__}",
    }
    with peer_server(
        name, command, url=url, ready_url=f"{url}/health", users=users, notes=notes
    ) as target:
        yield target

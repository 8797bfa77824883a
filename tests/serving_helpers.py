"""Shared pieces of the `shitu serve` tests: one demo library per session, real server processes.

The library is the demo's: generated product photos (shitu.demo), embedded with the shipped
default model, with the plain-background detector so shelf photos give one box per product.
"""

from __future__ import annotations

import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from shitu.cli.main import main as shitu_main
from shitu.demo import DemoSet, make_demo_set
from shitu.index import collect_items
from shitu.inference import default_model_dir

STARTUP_S = 60.0


@dataclass(frozen=True)
class DemoLibrary:
    model: Path
    gallery: Path  # the pristine library; each server gets a copy
    demo: DemoSet

    def gallery_items(self) -> list[tuple[Path, str]]:
        return [(item.path, item.label) for item in collect_items([self.demo.gallery_list])]

    def queries(self) -> list[tuple[Path, str]]:
        return [(item.path, item.label) for item in collect_items([self.demo.queries_list])]


_build_lock = threading.Lock()


def demo_library(root: Path) -> DemoLibrary:
    """Build the demo library under `root` once per test session."""
    with _build_lock:
        model, gallery = default_model_dir(), root / "gallery"
        demo = make_demo_set(root / "images")  # same seed, same files: cheap to redo
        if not gallery.exists():  # `index build` is atomic: the folder appears complete
            args = ["index", "build", "--gallery", str(demo.gallery_list), "--out", str(gallery)]
            if shitu_main([*args, "--model", str(model)]) != 0:
                raise RuntimeError(f"shitu index build failed for {gallery}")
        return DemoLibrary(model, gallery, demo)


class ServerProcess:
    """`shitu serve` on a free loopback port in a subprocess; `url` once /healthz answers."""

    def __init__(
        self,
        library: DemoLibrary,
        work: Path,
        *args: str,
        env: dict | None = None,
        open_files: int | None = None,
    ):
        """`open_files`: the server's limit on open file descriptors (ulimit -n)."""
        self.work = work
        self.gallery = work / "gallery"
        shutil.copytree(library.gallery, self.gallery)
        self.log = work / "server.log"
        self._log_file = self.log.open("w")
        command = [
            sys.executable, "-m", "shitu.cli.main", "serve",
            "--gallery", str(self.gallery), "--model", str(library.model),
            "--detector", "plain-background", "--port", "0", "--threads", "2", *args,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            text=True,
            env={**os.environ, **(env or {})},
            preexec_fn=None if open_files is None else partial(_limit_open_files, open_files),
        )
        self.url = self._wait_ready()

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + STARTUP_S
        ready, _, _ = select.select([self.process.stdout], [], [], STARTUP_S)
        line = self.process.stdout.readline() if ready else ""  # "serving ... at URL"
        self.banner = line.strip()
        if " at http://" not in line:
            self.stop()
            raise AssertionError(f"server did not start: {line!r}\n{self.log.read_text()}")
        url = line.split(" at ", 1)[1].split()[0]
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    return url
            except httpx.TransportError:
                time.sleep(0.1)
        self.stop()
        raise AssertionError(f"no /healthz from {url} in {STARTUP_S}s\n{self.log.read_text()}")

    def stop(self) -> int:
        """SIGTERM (graceful shutdown) and wait; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()
        self._log_file.close()
        return self.process.returncode


def _limit_open_files(count: int) -> None:
    """Set this process's limit on open file descriptors (in a server's child, before exec)."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (count, count))


# What a proxy does not pass on: hop-by-hop headers, and the length it sets itself.
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


class PrefixProxy:
    """A reverse proxy on a free loopback port that serves `upstream` under `prefix` and
    strips it, as nginx's `location /shitu/ { proxy_pass http://UPSTREAM/; }` does (with its
    redirect of `/shitu` to `/shitu/`); `url` is the prefix's address, ending in '/'."""

    def __init__(self, upstream: str, prefix: str = "/shitu") -> None:
        client = httpx.Client(base_url=upstream, timeout=120)

        class Forward(BaseHTTPRequestHandler):
            def forward(self) -> None:
                if self.path == prefix:
                    self.answer(301, [("Location", f"{prefix}/")], b"")
                    return
                if not self.path.startswith(f"{prefix}/"):
                    self.answer(404, [], b"not under the prefix")
                    return
                length = int(self.headers.get("Content-Length") or 0)
                reply = client.request(
                    self.command,
                    self.path[len(prefix) :],
                    headers=[
                        (k, v) for k, v in self.headers.items() if k.lower() not in HOP_HEADERS
                    ],
                    content=self.rfile.read(length),
                )
                headers = [(k, v) for k, v in reply.headers.multi_items() if k not in HOP_HEADERS]
                self.answer(reply.status_code, headers, reply.content)

            def answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                for name, value in [*headers, ("Content-Length", str(len(body)))]:
                    self.send_header(name, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_POST = do_PATCH = do_DELETE = forward

            def log_message(self, *args: object) -> None:
                pass

        self._client = client
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
        self.url = f"http://127.0.0.1:{self._server.server_port}{prefix}/"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._client.close()

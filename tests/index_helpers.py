"""Shared pieces of the gallery-library tests: data, a tiny real embedder, crash runner."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from shitu.index import Gallery


def clustered(count: int, dim: int, clusters: int = 20, seed: int = 0) -> np.ndarray:
    """Vectors around random centres: like real embeddings, neighbours are meaningful."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    points = centres[rng.integers(0, clusters, count)] + 0.3 * rng.standard_normal((count, dim))
    return points.astype(np.float32)


def exact_top_k(gallery: np.ndarray, queries: np.ndarray, k: int, metric: str) -> np.ndarray:
    """Brute-force neighbour positions with numpy (independent of Faiss)."""
    if metric == "ip":
        scores = queries @ gallery.T
    else:
        scores = -((queries[:, None, :] - gallery[None]) ** 2).sum(-1)
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@dataclass
class TinyExtraction:
    features: np.ndarray
    paths: list[str]
    failures: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class PixelEmbedder:
    """A real (if crude) image embedder: the image shrunk to side x side RGB, L2-normalised."""

    side: int = 4
    fingerprint: str = "pixels-4"
    preprocessing: dict = field(default_factory=lambda: {"resize": 4})

    @property
    def embedding_size(self) -> int:
        return 3 * self.side * self.side

    def extract_files(
        self, paths: Sequence[str], batch_size: int = 32, progress: bool = False
    ) -> TinyExtraction:
        rows, done, failures = [], [], []
        for path in paths:
            try:
                with Image.open(path) as image:
                    small = image.convert("RGB").resize((self.side, self.side), Image.BILINEAR)
            except OSError as exc:
                failures.append((str(path), str(exc)))
                continue
            rows.append(np.asarray(small, dtype=np.float32).reshape(-1) - 127.5)
            done.append(str(path))
        features = unit(np.stack(rows)) if rows else np.zeros((0, self.embedding_size), np.float32)
        return TinyExtraction(features, done, failures)


def make_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """Distinct small colour images (random blocks) written as PNG."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        pixels = np.kron(blocks, np.ones((8, 8, 1), dtype=np.uint8))
        path = folder / f"img{i:03d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def snapshot(path: Path, queries: np.ndarray) -> tuple:
    """Everything a user sees of a library: its rows and its search results."""
    with Gallery.open(path) as gallery:
        assert gallery.verify() == []
        result = gallery.search(queries, k=5)
        rows = [(e.id, e.label, e.sha256) for e in gallery.entries()]
        return rows, result.ids.tolist(), result.labels.tolist()


def run_killed(path: Path, point: str, code: str) -> subprocess.CompletedProcess:
    """Run `code` (with `gallery` open on `path`) in a subprocess that SIGKILLs at `point`."""
    script = textwrap.dedent(
        f"""
        import numpy as np
        from shitu.index import Gallery
        gallery = Gallery.open({str(path)!r})
        """
    ) + textwrap.dedent(code)
    env = {**os.environ, "SHITU_INDEX_CRASH_AT": point}
    return subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )


@contextmanager
def other_process_holding(library: Path, begin: str) -> Iterator[subprocess.Popen]:
    """Another process in the middle of a transaction on `library`'s database (`begin`:
    "BEGIN" then a read holds the read lock, "BEGIN IMMEDIATE" the write lock), from the
    time it says so until the block ends."""
    script = textwrap.dedent(
        f"""
        import sqlite3, sys
        conn = sqlite3.connect({str(library / "gallery.sqlite")!r}, isolation_level=None)
        conn.execute({begin!r})
        conn.execute("SELECT COUNT(*) FROM images").fetchone()
        print("holding", flush=True)
        sys.stdin.read()
        conn.execute("ROLLBACK")
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline() == "holding\n"
        yield process
    finally:
        process.stdin.close()
        process.wait(30)

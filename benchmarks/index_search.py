"""Gallery library vs Faiss called directly: build time, memory, queries/s, recall@10, and
the time one small write takes.

Usage: python benchmarks/index_search.py [--sizes 100000 1000000] [--types Flat HNSW32 IVFPQ]
       [--dim 512] [--queries 1000] [--threads 2] [--ef-search 64] [--nprobe N]
Random unit vectors (the hardest case for approximate indexes: no cluster structure).
recall@k: the share of each query's exact k nearest vectors (a Flat index's) that the
library returns, averaged over the queries: how much an approximate index misses.
"Faiss" is the library's own index object, so the overhead columns are exactly what
`Gallery.search` adds (query checks, normalisation, score conversion, id -> label lookup).
The Faiss time is measured inside each `Gallery.search` call (best of --repeats), so the
overhead is not blurred by run-to-run noise on a shared machine. Build time is the whole
library write (SQLite rows with features, index, checksum); "disk MiB" is the library folder.
"add 1 s" times --writes adds of one vector to the built library, opened anew (each a whole
write: SQLite commit and whatever the index needs), the cost of one upload to `shitu serve`:
the first, and the median of the others.
Prints a Markdown table.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
from arguments import benchmark_parser, count, folder

from shitu.index import INDEX_TYPES, Gallery

SINGLE_QUERIES = 200


def unit_vectors(count: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, 100_000):  # chunks keep the float64 temporaries small
        block = rng.standard_normal((min(100_000, count - start), dim))
        out[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


class TimedIndex:
    """Wraps the library's Faiss index to time the Faiss call inside each `Gallery.search`."""

    def __init__(self, index: faiss.Index) -> None:
        self.index = index
        self.seconds = 0.0

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        start = time.perf_counter()
        result = self.index.search(queries, k)
        self.seconds += time.perf_counter() - start
        return result


def search_rates(gallery: Gallery, queries: np.ndarray, k: int, repeats: int) -> list[float]:
    """q/s of Faiss alone and of `Gallery.search`, measured on the same calls.

    Timing the Faiss call inside our search (instead of separate runs) keeps a busy
    machine's noise out of the overhead. Returns [faiss, ours] for one batch of all queries,
    then for the queries one at a time; best of `repeats`.
    """
    timed = TimedIndex(gallery._backend.index)
    gallery._backend.index = timed
    rates = []
    for batches in (
        [queries],
        [queries[i : i + 1] for i in range(min(len(queries), SINGLE_QUERIES))],
    ):
        count = sum(len(b) for b in batches)
        best_inner, best_total = float("inf"), float("inf")
        for _ in range(repeats + 1):  # the first run warms up
            timed.seconds = 0.0
            start = time.perf_counter()
            for batch in batches:
                gallery.search(batch, k)
            total = time.perf_counter() - start
            best_inner, best_total = min(best_inner, timed.seconds), min(best_total, total)
        rates += [count / best_inner, count / best_total]
    gallery._backend.index = timed.index
    return rates


def write_seconds(gallery: Gallery, writes: int, dim: int) -> tuple[float, float]:
    """Seconds of the first of `writes` adds of one new vector each (Faiss grows a loaded
    index's storage then, copying it), and the median of the rest."""
    times = []
    for vector in unit_vectors(writes, dim, seed=2):
        start = time.perf_counter()
        gallery.add(vector, ["added"])
        times.append(time.perf_counter() - start)
    return times[0], float(np.median(times[1:]))


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth, strict=True)]))


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--sizes", type=count, nargs="+", default=[100_000], help="gallery sizes")
    parser.add_argument(
        "--types",
        nargs="+",
        default=["Flat", "HNSW32", "IVFPQ"],
        choices=INDEX_TYPES,
        help="index types",
    )
    parser.add_argument("--dim", type=count, default=512, help="vector dimension")
    parser.add_argument("--queries", type=count, default=1000, help="query vectors")
    parser.add_argument("--k", type=count, default=10, help="results per query")
    parser.add_argument("--threads", type=count, default=2, help="Faiss threads")
    parser.add_argument("--repeats", type=count, default=3, help="timed runs, best kept")
    parser.add_argument("--writes", type=count, default=6, help="timed one-vector adds (>= 2)")
    parser.add_argument("--ef-search", type=count, help="HNSW search depth (library default 64)")
    parser.add_argument("--nprobe", type=count, help="IVF lists searched (default nlist/16, >= 8)")
    parser.add_argument(
        "--workdir", type=folder, help="where libraries are built (default: a temporary folder)"
    )
    args = parser.parse_args()
    if args.writes < 2:  # the first add is timed apart: "later" needs at least one more
        parser.error("--writes must be at least 2")
    if args.k > min(args.sizes):  # recall@k was of k ids a smaller gallery cannot all hold
        parser.error(
            f"--k {args.k}: more than the smallest of --sizes, {min(args.sizes)}: a gallery "
            "returns at most its size, so recall@k would fall short on an exact index"
        )
    faiss.omp_set_num_threads(args.threads)
    options = {
        key: value
        for key, value in (("ef_search", args.ef_search), ("nprobe", args.nprobe))
        if value is not None
    }

    print(
        f"faiss {faiss.__version__}, {args.threads} threads, {args.dim}-d random unit vectors, "
        f"{args.queries} queries, k={args.k}, search options {options or 'default'}\n"
    )
    print(
        f"| N | index | build s | index MiB | disk MiB | recall@{args.k} | q/s batch (faiss) "
        "| q/s batch (ours) | overhead | q/s 1-by-1 (faiss) | q/s 1-by-1 (ours) | overhead "
        "| add 1 s first | add 1 s later |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        for size in args.sizes:
            data = unit_vectors(size, args.dim, seed=0)
            queries = unit_vectors(args.queries, args.dim, seed=1)
            exact = faiss.IndexFlatIP(args.dim)
            exact.add(data)
            truth = exact.search(queries, args.k)[1] + 1  # library ids start at 1
            del exact
            labels = [f"label {i % 1000}" for i in range(size)]
            for index_type in args.types:
                path = Path(work) / f"{index_type}-{size}"
                start = time.perf_counter()
                with Gallery.create(
                    path,
                    embedding_dim=args.dim,
                    model_fingerprint="random",
                    index_type=index_type,
                    backend_options=options,
                ) as gallery:
                    gallery.add(data, labels)
                build = time.perf_counter() - start
                disk_mb = sum(f.stat().st_size for f in path.iterdir()) / 2**20
                gallery = Gallery.open(path)
                ours = gallery.search(queries, args.k)
                recall = recall_at(ours.ids, truth)

                rates = search_rates(gallery, queries, args.k, args.repeats)
                index_mb = gallery.manifest.index_state["bytes"] / 2**20
                built = gallery.manifest.index_state["built_type"]
                first_add, later_add = write_seconds(gallery, args.writes, args.dim)
                gallery.close()
                # Too few vectors to train IVF/IVFPQ: the library searches exactly (Flat).
                shown = index_type if built == index_type else f"{index_type} (as {built})"
                print(
                    f"| {size:,} | {shown} | {build:.1f} | {index_mb:.0f} | {disk_mb:.0f} "
                    f"| {recall:.3f} | {rates[0]:,.0f} | {rates[1]:,.0f} "
                    f"| {100 * (rates[0] / rates[1] - 1):+.1f}% | {rates[2]:,.0f} "
                    f"| {rates[3]:,.0f} | {100 * (rates[2] / rates[3] - 1):+.1f}% "
                    f"| {first_add:.3f} | {later_add:.3f} |",
                    flush=True,
                )
                for leftover in path.iterdir():
                    leftover.unlink()


if __name__ == "__main__":
    main()

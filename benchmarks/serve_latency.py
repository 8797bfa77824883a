"""`shitu serve` under load on loopback: requests/s and p50/p99 latency of POST /v1/recognize
with 1, 4 and 16 concurrent clients, with and without batching across requests.

Starts the server itself (a subprocess, like a user would) on a free port, once per
--max-batch value, over a gallery of random vectors (search cost depends only on its size)
and the demo's shelf photo of 4 products (plain-background detector: 4 boxes + the whole
image embedded per request). Each row sends --requests requests (at most --seconds long).
Without --model, the shipped default model is used if installed, else PP-LCNetV2 base is
exported with random weights.

    python benchmarks/serve_latency.py --requests 200
"""

from __future__ import annotations

import platform
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from arguments import benchmark_parser, count, seconds
from common import model_dir, random_gallery

from shitu.demo import make_demo_set
from shitu.inference import FeatureExtractor

STARTUP_S = 120
ROW = "| {} | {} | {} | {} | {} | {} | {} |"


def start_server(arguments: list[str]) -> tuple[subprocess.Popen, str]:
    """`shitu serve ... --port 0`; returns the process and its URL once /healthz answers."""
    command = [sys.executable, "-m", "shitu.cli.main", "serve", "--port", "0", *arguments]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    ready, _, _ = select.select([process.stdout], [], [], STARTUP_S)
    line = process.stdout.readline() if ready else ""
    if " at http://" not in line:
        process.kill()
        sys.exit(f"server did not start: {line!r}")
    url = line.split(" at ", 1)[1].split()[0]
    for _ in range(STARTUP_S * 10):
        try:
            httpx.get(f"{url}/healthz").raise_for_status()
            return process, url
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    sys.exit(f"no /healthz from {url}")


def load(url: str, photo: bytes, clients: int, requests: int, seconds: float) -> dict:
    """`clients` threads send `requests` recognitions in all; latencies in ms, wall time."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    budget = iter(range(requests))
    deadline = time.perf_counter() + seconds

    def client() -> None:
        nonlocal errors
        with httpx.Client(base_url=url, timeout=120) as http:
            while time.perf_counter() < deadline:
                with lock:
                    if next(budget, None) is None:
                        return
                start = time.perf_counter()
                response = http.post("/v1/recognize", files={"image": ("shelf.jpg", photo)})
                elapsed = (time.perf_counter() - start) * 1000
                with lock:
                    latencies.append(elapsed)
                    errors += response.status_code != 200

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    values = np.asarray(latencies)
    no_request = not len(values)  # --seconds shorter than one request: no latency to show
    return {
        "done": len(values),
        "rps": len(values) / wall,
        "p50": float("nan") if no_request else float(np.percentile(values, 50)),
        "p99": float("nan") if no_request else float(np.percentile(values, 99)),
        "errors": errors,
    }


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--model", help="exported model folder")
    parser.add_argument("--gallery-size", type=count, default=10000, help="random gallery vectors")
    parser.add_argument(
        "--clients", type=count, nargs="+", default=[1, 4, 16], help="concurrent clients"
    )
    parser.add_argument(
        "--max-batch",
        type=count,
        nargs="+",
        default=[1, 8],
        help="the service's --max-batch values",
    )
    parser.add_argument("--requests", type=count, default=100, help="requests per row")
    parser.add_argument("--seconds", type=seconds, default=60, help="longest time per row")
    parser.add_argument("--threads", type=count, help="model threads (default: the runtime's)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        demo = make_demo_set(tmp / "demo")
        photo = demo.shelves[0][0].read_bytes()
        model = model_dir(args.model, tmp)
        extractor = FeatureExtractor.load(model)
        random_gallery(tmp / "gallery", extractor, args.gallery_size)
        serve = ["--gallery", str(tmp / "gallery"), "--model", str(model)]
        serve += ["--detector", "plain-background", "--score-thres", "-1"]
        if args.threads:
            serve += ["--threads", str(args.threads)]
        servers = {}
        try:  # all servers up at once (idle ones cost nothing), rows interleaved: a load
            # that drifts during the run then touches every setting alike
            for max_batch in args.max_batch:
                servers[max_batch] = start_server([*serve, "--max-batch", str(max_batch)])
                load(servers[max_batch][1], photo, 4, 8, args.seconds)  # warm-up
            threads = args.threads or "the runtime's"
            print(
                f"model {model}, plain-background detector, gallery {args.gallery_size} "
                f"vectors, threads {threads}, {platform.processor() or platform.machine()}\n"
            )
            print(
                ROW.format(
                    "max batch", "clients", "requests", "requests/s", "p50 ms", "p99 ms", "errors"
                )
            )
            print("|---:|---:|---:|---:|---:|---:|---:|")
            for clients in args.clients:
                for max_batch, (_, url) in servers.items():
                    row = load(url, photo, clients, args.requests, args.seconds)
                    numbers = [f"{row[key]:.1f}" for key in ("rps", "p50", "p99")]
                    print(ROW.format(max_batch, clients, row["done"], *numbers, row["errors"]))
        finally:
            for process, _ in servers.values():
                process.send_signal(signal.SIGTERM)
                process.wait(60)


if __name__ == "__main__":
    main()

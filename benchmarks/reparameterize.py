"""Inference speed of PP-LCNetV2 ShiTu backbones before and after `reparameterize()`.

Usage: python benchmarks/reparameterize.py [--threads 2] [--batches 1 32] [--repeats 5]
Prints a Markdown table: images/s (median of repeats) and the largest output change.
"""

from __future__ import annotations

import statistics
import time

import torch
from arguments import add_batch_timing_arguments, benchmark_parser, count

from shitu.config.schema import ArchConfig
from shitu.models import build_model


def images_per_second(model: torch.nn.Module, batch: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        model(batch)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(batch)
            times.append(time.perf_counter() - start)
    return batch.shape[0] / statistics.median(times)


def main() -> None:
    parser = benchmark_parser(__doc__)
    add_batch_timing_arguments(parser)
    parser.add_argument("--repeats", type=count, default=5, help="timed runs, median kept")
    parser.add_argument("--size", type=count, default=224, help="input size in pixels")
    parser.add_argument(
        "--scales",
        nargs="+",
        default=["small", "base", "large"],
        choices=["small", "base", "large"],
        help="PP-LCNetV2 scales",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    print(f"torch {torch.__version__}, {args.threads} threads, input {args.size}x{args.size}\n")
    print("| model | batch | images/s plain | images/s reparameterised | speed-up | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for scale in args.scales:
        arch = ArchConfig.model_validate(
            {
                "Backbone": {"name": f"PPLCNetV2_{scale}_ShiTu"},
                "BackboneStopLayer": {"name": "flatten"},
                "Neck": {"name": "BNNeck", "num_features": 512},
            }
        )
        plain = build_model(arch).eval()
        folded = build_model(arch).eval()
        folded.load_state_dict(plain.state_dict())
        folded.reparameterize()
        for batch_size in args.batches:
            batch = torch.randn(batch_size, 3, args.size, args.size)
            with torch.inference_mode():
                diff = (plain(batch)["features"] - folded(batch)["features"]).abs().max().item()
            before = images_per_second(plain, batch, args.repeats)
            after = images_per_second(folded, batch, args.repeats)
            print(
                f"| PPLCNetV2_{scale}_ShiTu | {batch_size} | {before:.1f} | {after:.1f} "
                f"| {after / before:.2f}x | {diff:.1e} |"
            )


if __name__ == "__main__":
    main()

"""Training-step throughput of shipped recipes: images/s and peak memory per precision.

Usage: python benchmarks/train_throughput.py [-c CONFIG ...] [--batch 64] [--steps 10]
           [--amp off bf16 fp16] [--layout nhwc nchw] [--allocator keep glibc]
           [--size 224] [--threads 2]

Runs the recipe's model (its classification head as the config has it: PaddleClas's
192,612 classes for PP-LCNetV2), losses and optimizer (as `shitu train` builds them) on
random images and PK-style labels, so the number is the model's compute speed without data
loading. Peak memory is CUDA's max_memory_allocated on a GPU and the process's peak RSS
on a CPU; each row runs in a fresh process so rows do not share a peak. The defaults are
what `shitu train` does: channels-last activations (`Global.channels_last`) and malloc
keeping freed memory (`shitu.runtime.keep_freed_memory`); `--layout nchw` and
`--allocator glibc` measure without them. Prints a Markdown table.
"""

from __future__ import annotations

import itertools
import multiprocessing
import resource
import statistics
import time

import torch
from arguments import benchmark_parser, count

from shitu.config import load_config
from shitu.engine.optim import build_optimizer
from shitu.engine.precision import autocast_for, effective_amp
from shitu.losses.combined import CombinedLoss
from shitu.models import build_model
from shitu.runtime import keep_freed_memory


def pk_labels(batch_size: int, per_class: int, device: torch.device) -> torch.Tensor:
    return torch.arange(batch_size, device=device) // per_class


def measure(
    config_name: str,
    batch_size: int,
    steps: int,
    amp: str,
    channels_last: bool,
    size: int,
    threads: int | None,
    allocator: str,
) -> tuple[str, float, float]:
    """(amp run, images/s, peak memory in MiB) over `steps` timed steps after two warm-ups.

    The amp run is "off" where the device cannot run the one asked for (see effective_amp).
    """
    if threads:
        torch.set_num_threads(threads)
    if allocator == "keep":
        keep_freed_memory()
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = effective_amp(amp, device)
    config = load_config(config_name)
    # No ImageNet weights: speed does not depend on them, nor need the [pretrained] extra
    # be installed. The head is the config's, as `shitu train` trains it.
    model = build_model(config.Arch, pretrained=False).to(device).train()
    loss_fn = CombinedLoss(config.Loss.Train).to(device).train()
    optimizer = build_optimizer([model, loss_fn], config.Optimizer, 1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16" and device.type == "cuda")
    images = torch.randn(batch_size, 3, size, size, device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    labels = pk_labels(batch_size, 4, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        with autocast_for(device, amp):
            outputs = model(images, labels)
        loss, _ = loss_fn(outputs, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    times = []
    for index in range(steps + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if index >= 2:
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    return amp, batch_size / statistics.median(times), peak


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument(
        "-c",
        "--configs",
        nargs="+",
        default=["GeneralRecognitionV2_PPLCNetV2_base"],
        help="training configs",
    )
    parser.add_argument("--batch", type=count, default=64, help="images per step")
    parser.add_argument("--steps", type=count, default=10, help="timed steps")
    parser.add_argument(
        "--amp", nargs="+", default=["off"], choices=["off", "bf16", "fp16"], help="precisions"
    )
    parser.add_argument(
        "--layout", nargs="+", default=["nhwc"], choices=["nhwc", "nchw"], help="memory layouts"
    )
    parser.add_argument("--size", type=count, default=224, help="input size in pixels")
    parser.add_argument("--threads", type=count, default=None, help="CPU threads (default: all)")
    parser.add_argument(
        "--allocator",
        nargs="+",
        default=["keep"],
        choices=["keep", "glibc"],
        help="memory allocators",
    )
    args = parser.parse_args()
    if args.batch < 2:  # else batch norm's ValueError, from the worker process
        parser.error(f"--batch {args.batch}: batch norm trains on 2 or more images a step")
    if torch.cuda.is_available():
        where = torch.cuda.get_device_name()
    else:
        where = f"CPU, {args.threads or torch.get_num_threads()} threads"
    memory = "peak GPU MiB" if torch.cuda.is_available() else "peak RSS MiB"
    print(f"torch {torch.__version__}, {where}, input {args.size}x{args.size}\n")
    print(f"| config | batch | amp | layout | allocator | images/s | {memory} |")
    print("|---|---:|---|---|---|---:|---:|")
    rows = itertools.product(args.configs, args.amp, args.layout, args.allocator)
    for name, amp, layout, allocator in rows:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            used, speed, peak = pool.apply(
                measure,
                (
                    name,
                    args.batch,
                    args.steps,
                    amp,
                    layout == "nhwc",
                    args.size,
                    args.threads,
                    allocator,
                ),
            )
        print(
            f"| {name} | {args.batch} | {used} | {layout} | {allocator} | "
            f"{speed:.1f} | {peak:.0f} |"
        )


if __name__ == "__main__":
    main()

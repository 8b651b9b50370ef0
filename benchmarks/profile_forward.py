#!/usr/bin/env python3
"""Where a forward through torch_dp.DataParallel spends its time, against the ideal (the same chunks one after
another through the plain module): wall-clock time per forward of the plain module, the ideal and torch_dp side
by side; then torch.profiler over every thread (the replicas' workers included) for torch_dp and for the ideal:
CPU time and kernel time per forward (a device busy well below 100% means the host cannot issue the work fast
enough), and a table of torch_dp's events with the most CPU time.

    python benchmarks/profile_forward.py [--device cpu|cuda] [--model tiny|mlp|resnet50] [--replicas N]
                                         [--iters N] [--issuing auto|threads|serial] [--trace PATH]

tiny = Linear(5, 2) batch 30 (pure overhead; BENCHMARKS.md has its target on [0, 0]); mlp = 8 x Linear(1024, 1024)
batch 256; resnet50 = torchvision's ResNet-50 batch 64 (eval). --trace writes torch_dp's Chrome trace
(chrome://tracing, Perfetto) with one row per thread.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_dp import MODELS, settled_issuing, torch_dp  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--issuing", choices=["auto", "threads", "serial"], default="auto")
    parser.add_argument("--trace", metavar="PATH", help="write a Chrome trace there")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device")
    if args.replicas < 1 or args.iters < 1:
        parser.error("--replicas and --iters must be at least 1")
    cuda = args.device == "cuda"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    label, make = MODELS[args.model]
    module, shape = make()
    module = module.to(device).eval()
    x = torch.randn(*shape, device=device)
    chunks = x.chunk(args.replicas)
    dp = torch_dp.DataParallel(module, [0] * args.replicas if cuda else ["cpu"] * args.replicas, issuing=args.issuing)

    def ideal(_: torch.Tensor) -> None:
        for c in chunks:
            module(c)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def per_forward_ms(fn: Callable[[torch.Tensor], Any]) -> float:
        with torch.no_grad():
            for _ in range(20):
                fn(x)
            sync()
            start = time.perf_counter()
            for _ in range(args.iters):
                fn(x)
            sync()
        return (time.perf_counter() - start) * 1e3 / args.iters

    wall = {name: per_forward_ms(fn) for name, fn in (("plain", module), ("ideal", ideal), ("torch_dp", dp))}

    # The four steps as profiler events of their own, on this instance only (the library keeps one event per
    # forward, to stay cheap), installed after the wall-clock timing since record_function costs microseconds.
    for step in ("scatter", "replicate", "parallel_apply", "gather"):
        method = getattr(dp, step)

        def timed(*a, _method=method, _name=f"DataParallel.{step}", **k):
            with torch.profiler.record_function(_name):
                return _method(*a, **k)

        setattr(dp, step, timed)

    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    profiles = {}
    for name, fn in (("ideal", ideal), ("torch_dp", dp)):
        with torch.no_grad(), torch.profiler.profile(activities=activities) as profile:
            for _ in range(args.iters):
                fn(x)
            sync()
        profiles[name] = profile

    where = f"{args.device}{', ' + torch.cuda.get_device_name() if cuda else ''}"
    issuing = args.issuing
    if issuing == "auto" and args.replicas > 1:
        issuing += f", settled on {settled_issuing(dp)}"
    print(
        f"{label} on {args.replicas} replicas ({where}, torch {torch.__version__}, issuing={issuing}), "
        f"wall clock per forward, {args.iters} forwards after 20 warm-up:"
    )
    print(
        "  "
        + ", ".join(f"{name} {ms:.4f} ms" for name, ms in wall.items())
        + f"; torch_dp/ideal {wall['torch_dp'] / wall['ideal']:.2f}"
        + f", torch_dp/plain {wall['torch_dp'] / wall['plain']:.2f}"
    )
    print("under the profiler, per forward (all threads):")
    for name, profile in profiles.items():
        events = profile.key_averages()
        cpu_ms = sum(e.self_cpu_time_total for e in events) / 1e3 / args.iters
        # Kernel time through the aten ops that launched it: the kernels' own rows, and the device-side ranges
        # of record_function annotations, would count it again.
        aten = [e for e in events if e.key.startswith("aten::")]
        device_ms = sum(getattr(e, "self_device_time_total", 0) for e in aten) / 1e3 / args.iters
        ops = sum(e.count for e in aten) / args.iters
        busy = f" (device busy {100 * device_ms / wall[name]:.0f}% of the wall clock)" if cuda else ""
        print(f"  {name:8s}: self CPU {cpu_ms:.3f} ms, kernels {device_ms:.3f} ms{busy}, {ops:.0f} aten ops")
    print(profiles["torch_dp"].key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))
    if args.trace:
        profiles["torch_dp"].export_chrome_trace(args.trace)
        print(f"profile_forward: wrote {args.trace}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

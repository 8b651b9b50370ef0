#!/usr/bin/env python3
"""Where a small model's forward through torch_dp.DataParallel spends its time: torch.profiler over a few hundred
forwards after warm-up, every thread (the replicas' workers included), printed as a table of the events with the
most CPU time, and the wall-clock time per forward of the plain module and of torch_dp side by side.

    python benchmarks/profile_forward.py [--device cpu|cuda] [--model tiny|mlp] [--replicas N] [--iters N]
                                         [--trace PATH]

tiny = Linear(5, 2) batch 30 (pure overhead; issue 5's 0.12 ms target on [0, 0]); mlp = 8 x Linear(1024, 1024)
batch 256. --trace writes a Chrome trace (chrome://tracing, Perfetto) with one row per thread.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_dp import make_mlp, make_tiny, torch_dp  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=["tiny", "mlp"], default="tiny")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--trace", metavar="PATH", help="write a Chrome trace there")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device")
    if args.replicas < 1 or args.iters < 1:
        parser.error("--replicas and --iters must be at least 1")
    cuda = args.device == "cuda"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    module, shape = make_tiny() if args.model == "tiny" else make_mlp()
    module = module.to(device).eval()
    x = torch.randn(*shape, device=device)
    dp = torch_dp.DataParallel(module, [0] * args.replicas if cuda else ["cpu"] * args.replicas)
    # The four steps as profiler events of their own (on this instance only: the library keeps one event per
    # forward, to stay cheap).
    for step in ("scatter", "replicate", "parallel_apply", "gather"):
        method = getattr(dp, step)

        def timed(*a, _method=method, _name=f"DataParallel.{step}", **k):
            with torch.profiler.record_function(_name):
                return _method(*a, **k)

        setattr(dp, step, timed)

    def per_forward_ms(fn) -> float:
        with torch.no_grad():
            for _ in range(20):
                fn(x)
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.iters):
                fn(x)
            if cuda:
                torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e3 / args.iters

    plain_ms, dp_ms = per_forward_ms(module), per_forward_ms(dp)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.no_grad(), torch.profiler.profile(activities=activities) as profile:
        for _ in range(args.iters):
            dp(x)
        if cuda:
            torch.cuda.synchronize()
    print(f"{args.model} on {args.replicas} replicas ({args.device}{', ' + torch.cuda.get_device_name() if cuda else ''}"
          f", torch {torch.__version__}): plain {plain_ms:.4f} ms, torch_dp {dp_ms:.4f} ms per forward "
          f"(wall clock, {args.iters} forwards after 20 warm-up)")
    print(profile.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))
    if args.trace:
        profile.export_chrome_trace(args.trace)
        print(f"profile_forward: wrote {args.trace}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

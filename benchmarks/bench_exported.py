#!/usr/bin/env python3
"""Inference over an AOTInductor package (.pt2) and a TorchScript module, side by side, on the CPU (or CUDA
with --device cuda):

    python benchmarks/bench_exported.py [--device cpu|cuda] [--quick] [--json PATH] [--replicas 2,4]

For two models compiled with torch._inductor.aoti_compile_and_package (examples/python/export_model.py's
Linear(8, 16)-ReLU-Linear(16, 4) on 64 rows, and an MLP of 3 x Linear(1024, 1024) on 512 rows; both with a dynamic
batch dimension, compiled once into ~/.cache/torch_dp/exported-<torch version>/), and each replica count, one run
times:

  plain        the package unwrapped: torch._inductor.aoti_load_package(path), on the whole batch
  torch_dp     torch_dp.PackageDataParallel(path, [device] * k): a loader per replica, C++ worker threads, the GIL
               released (issuing="auto", timed after it settled) ...
  threads      ... the same with issuing="threads" (every replica at once)
  py threads   the loop a user would write: k loaded packages, a persistent pool of k Python threads
               (concurrent.futures), each running its own package on its torch.chunk of the batch, then torch.cat
  eager DP     the eager module under torch_dp.DataParallel(module, [device] * k), no_grad: the Python module
               runs in every replica, each taking the GIL
  eager        the eager module on the whole batch, no_grad

A second table runs the same two models as TorchScript modules (torch.jit.script): plain is the scripted module
on the whole batch, torch_dp is torch_dp.DataParallel over it (replicas run the compiled code without the GIL),
py threads the same loop over k scripted copies, eager DP as above.

The variants are timed interleaved (round-robin) so that drift on a noisy machine hits all of them alike; each
figure is the median over rounds of a block's mean time per call, after warm-up. Every variant's output is
checked against plain's first.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
    import torch_dp
except ImportError:  # run from a source checkout with the module built in place (scripts/build.sh)
    sys.path.insert(0, os.path.join(REPO, "python"))
    import torch_dp

sys.path.insert(0, os.path.join(REPO, "examples", "python"))
import export_model  # noqa: E402 - examples/python/export_model.py


class WideMLP(nn.Module):
    def __init__(self, width: int = 1024) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def compiled(model: nn.Module, features: int, path: str, device: torch.device) -> str:
    """`path`, compiled from `model` (on `device`, dynamic batch) unless it is there already; `model` then holds
    the package's weights (kept beside it)."""
    weights = path + ".state.pt"
    if not (os.path.exists(path) and os.path.exists(weights)):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        staging = f"{path}.{os.getpid()}.tmp.pt2"
        with torch.no_grad():
            export_model.export_package(model, (torch.randn(8, features, device=device),), staging, ({0: batch},))
        torch.save(model.state_dict(), weights)
        os.replace(staging, path)
    model.load_state_dict(torch.load(weights, map_location=device))
    return path


def time_interleaved(fns: dict[str, Callable[[], Any]], warmup: int, rounds: int, block: int) -> dict[str, float]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate who goes first
        for name in order:
            fn = fns[name]
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(block):
                fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            samples[name].append((time.perf_counter() - start) / block * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def bench_model(
    name: str,
    model: nn.Module,
    path: str,
    batch: int,
    features: int,
    replicas: list[int],
    device: torch.device,
    quick: bool,
) -> list[dict[str, Any]]:
    x = torch.randn(batch, features, device=device)
    plain = torch._inductor.aoti_load_package(path)
    expected = plain(x)
    rows = []
    for k in replicas:
        ids = [device] * k
        pdp = torch_dp.PackageDataParallel(path, ids)
        pdp_threads = torch_dp.PackageDataParallel(path, ids, issuing="threads")
        loaders = [torch._inductor.aoti_load_package(path) for _ in range(k)]
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=k)

        def py_threads(loaders=loaders, pool=pool, k=k):
            chunks = torch.chunk(x, k)
            futures = [pool.submit(loaders[i], chunk) for i, chunk in enumerate(chunks)]
            return torch.cat([f.result() for f in futures])

        eager_dp = torch_dp.DataParallel(model, ids)

        def eager_dp_call(eager_dp=eager_dp):
            with torch.no_grad():
                return eager_dp(x)

        def eager_call():
            with torch.no_grad():
                return model(x)

        fns = {
            "plain": lambda: plain(x),
            "torch_dp": lambda pdp=pdp: pdp(x),
            "threads": lambda pdp=pdp_threads: pdp(x),
            "py threads": py_threads,
            "eager DP": eager_dp_call,
            "eager": eager_call,
        }
        for variant, fn in fns.items():
            torch.testing.assert_close(fn(), expected, rtol=1e-4, atol=1e-4, msg=lambda m, v=variant: f"{v}: {m}")
        # Warm-up long enough for issuing="auto" to settle (2 warm-up calls and up to 4 blocks of 12).
        warmup, rounds, block = (51, 7, 5) if quick else (60, 21, 20)
        times = time_interleaved(fns, warmup, rounds, block)
        pool.shutdown()
        settled = pdp._impl.pool.settled_auto_issuing.name
        rows.append({"model": name, "batch": batch, "device": device.type, "replicas": k, "ms": times, "auto": settled})
    return rows


def bench_script(
    name: str, model: nn.Module, batch: int, features: int, replicas: list[int], device: torch.device, quick: bool
) -> list[dict[str, Any]]:
    """The same model as a TorchScript module (torch.jit.script): unwrapped on the whole batch, under
    torch_dp.DataParallel, and in the hand-written loop (k scripted copies on k Python threads)."""
    x = torch.randn(batch, features, device=device)
    script = torch.jit.script(copy.deepcopy(model)).eval()
    with torch.no_grad():
        expected = script(x)
    rows = []
    for k in replicas:
        ids = [device] * k
        script_dp = torch_dp.DataParallel(script, ids)
        eager_dp = torch_dp.DataParallel(model, ids)
        copies = [torch.jit.script(copy.deepcopy(model)).eval() for _ in range(k)]
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=k)

        def py_threads(copies=copies, pool=pool, k=k):
            with torch.no_grad():
                futures = [pool.submit(copies[i], chunk) for i, chunk in enumerate(torch.chunk(x, k))]
                return torch.cat([f.result() for f in futures])

        def no_grad(fn: Callable[[], Any]) -> Callable[[], Any]:
            def call() -> Any:
                with torch.no_grad():
                    return fn()

            return call

        fns = {
            "plain": no_grad(lambda: script(x)),
            "torch_dp": no_grad(lambda dp=script_dp: dp(x)),
            "py threads": py_threads,
            "eager DP": no_grad(lambda dp=eager_dp: dp(x)),
        }
        for variant, fn in fns.items():
            torch.testing.assert_close(fn(), expected, rtol=1e-4, atol=1e-4, msg=lambda m, v=variant: f"{v}: {m}")
        # Warm-up long enough for issuing="auto" to settle (2 warm-up calls and up to 4 blocks of 12).
        warmup, rounds, block = (51, 7, 5) if quick else (60, 21, 20)
        times = time_interleaved(fns, warmup, rounds, block)
        pool.shutdown()
        rows.append({"model": name, "batch": batch, "device": device.type, "replicas": k, "ms": times})
    return rows


def print_script_table(rows: list[dict[str, Any]]) -> None:
    print(
        "| model, batch | replicas | plain | torch_dp | py threads | eager DP | plain / torch_dp "
        "| py threads / torch_dp |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        t = row["ms"]
        print(
            f"| {row['model']}, {row['batch']} | {row['device']} x{row['replicas']} | {t['plain']:.3f} "
            f"| {t['torch_dp']:.3f} | {t['py threads']:.3f} | {t['eager DP']:.3f} "
            f"| {t['plain'] / t['torch_dp']:.2f} | {t['py threads'] / t['torch_dp']:.2f} |"
        )


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        "| model, batch | replicas | plain | torch_dp (auto uses) | threads | py threads | eager DP | eager "
        "| plain / torch_dp | py threads / torch_dp | eager DP / torch_dp |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        t = row["ms"]
        print(
            f"| {row['model']}, {row['batch']} | {row['device']} x{row['replicas']} | {t['plain']:.3f} "
            f"| {t['torch_dp']:.3f} ({row['auto']}) | {t['threads']:.3f} | {t['py threads']:.3f} "
            f"| {t['eager DP']:.3f} | {t['eager']:.3f} "
            f"| {t['plain'] / t['torch_dp']:.2f} | {t['py threads'] / t['torch_dp']:.2f} "
            f"| {t['eager DP'] / t['torch_dp']:.2f} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (CI)")
    parser.add_argument("--replicas", default="2,4", help="comma-separated replica counts (default 2,4)")
    parser.add_argument("--json", help="write the figures and the run's metadata here")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", 0)
    replicas = [int(k) for k in args.replicas.split(",")]
    cache = os.path.join(
        os.path.expanduser("~"), ".cache", "torch_dp", f"exported-{torch.__version__}", f"bench-{device.type}"
    )
    torch.manual_seed(0)
    rows = []
    small = export_model.Model().to(device).eval()
    path = compiled(small, export_model.IN_FEATURES, os.path.join(cache, "small.pt2"), device)
    rows += bench_model("Linear(8,16)-ReLU-Linear(16,4)", small, path, 64, 8, replicas, device, args.quick)
    torch.manual_seed(1)
    wide = WideMLP().to(device).eval()
    path = compiled(wide, 1024, os.path.join(cache, "wide.pt2"), device)
    rows += bench_model("3 x Linear(1024,1024)", wide, path, 512, 1024, replicas, device, args.quick)
    print_table(rows)
    script_rows = bench_script("Linear(8,16)-ReLU-Linear(16,4)", small, 64, 8, replicas, device, args.quick)
    script_rows += bench_script("3 x Linear(1024,1024)", wide, 512, 1024, replicas, device, args.quick)
    print("\nTorchScript (torch.jit.script), ms per call:")
    print_script_table(script_rows)
    if args.json:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
        ).stdout.strip()
        meta = {
            "date": datetime.date.today().isoformat(),
            "commit": commit,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "command": " ".join(sys.argv),
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows, "script_rows": script_rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

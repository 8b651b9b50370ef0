#!/usr/bin/env python3
"""What keeping replicas current costs: copies refreshed on every forward (the default) against the opt-in
``trust_version_counters=True`` (copies refreshed only when a version counter or data pointer moved).

    python benchmarks/bench_refresh.py [--device cpu|cuda] [--quick] [--json PATH]

For each model (Linear(5, 2) batch 30; an MLP of 8 x Linear(1024, 1024) batch 256; a small BatchNorm conv net
batch 16 of 16 x 16 images) and replica path, one run times side by side, interleaved, medians after warm-up:

  replicate   dp.replicate(dp.module, dp.device_ids) with nothing changed, under no_grad
  inference   the whole forward under no_grad
  training    forward + backward + SGD step (the optimizer changes every parameter, so both variants copy them)

for ``default`` and ``trusting`` (trust_version_counters=True), and on CUDA also torch.nn.DataParallel's own
replicate and forward on the same device list.

Replica paths: ``shared`` is a device list on one device (["cpu"] * 2 or [0, 0]): replicas after the first share
the parameters and copy only the buffers. ``copies`` is the same list with every tensor copied, as replicas on
other devices do (the path of two distinct GPUs, reachable on one device through a test hook); ``distinct`` is
every GPU, when there are several.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Any, Callable

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_dp  # noqa: E402  - the shared clock, settings and metadata
from bench_dp import Clock, Settings, add_common_arguments, fmt_ms, metadata, time_interleaved, torch_dp  # noqa: E402


def make_convbn() -> tuple[torch.nn.Module, tuple[int, ...]]:
    layers: list[torch.nn.Module] = []
    channels = 3
    for width in (16, 32, 32, 64):
        layers += [
            torch.nn.Conv2d(channels, width, 3, padding=1, bias=False),
            torch.nn.BatchNorm2d(width),
            torch.nn.ReLU(),
        ]
        channels = width
    layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(channels, 10)]
    return torch.nn.Sequential(*layers), (16, 3, 16, 16)


MODELS: dict[str, Callable[[], tuple[torch.nn.Module, tuple[int, ...]]]] = {
    "tiny": bench_dp.make_tiny,
    "mlp": bench_dp.make_mlp,
    "convbn": make_convbn,
}


def replica_paths(device: torch.device) -> list[tuple[str, list[Any]]]:
    if device.type == "cuda":
        paths: list[tuple[str, list[Any]]] = [("shared", [0, 0]), ("copies", [0, 0])]
        if torch.cuda.device_count() > 1:
            paths.append(("distinct", list(range(torch.cuda.device_count()))))
        return paths
    return [("shared", ["cpu"] * 2), ("copies", ["cpu"] * 2)]


def make_dp(model: torch.nn.Module, ids: list[Any], path: str, trusting: bool) -> torch_dp.DataParallel:
    dp = torch_dp.DataParallel(model, ids, trust_version_counters=trusting)
    if path == "copies":  # the path of replicas on other devices, on one device
        dp._get_engine().replicas._replicator = torch_dp._C.Replicator(
            trust_version_counters=trusting, copy_everything=True
        )
    return dp


def bench(name: str, path: str, ids: list[Any], device: torch.device, clock: Clock, settings: Settings) -> dict:
    torch.manual_seed(0)
    model, shape = MODELS[name]()
    model = model.to(device)
    x = torch.randn(shape, device=device)
    impls: dict[str, torch.nn.Module] = {
        "default": make_dp(model, ids, path, trusting=False),
        "trusting": make_dp(model, ids, path, trusting=True),
    }
    if device.type == "cuda" and path != "copies":
        impls["nn.DP"] = torch.nn.DataParallel(model, ids)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    row: dict[str, Any] = {"model": name, "path": path, "ids": [str(i) for i in ids]}

    def replicate_fn(dp: torch.nn.Module) -> Callable[[], Any]:
        def fn() -> None:
            with torch.no_grad():
                dp.replicate(dp.module, dp.device_ids)

        return fn

    def inference_fn(dp: torch.nn.Module) -> Callable[[], Any]:
        def fn() -> None:
            with torch.no_grad():
                dp(x)

        return fn

    def training_fn(dp: torch.nn.Module) -> Callable[[], Any]:
        def fn() -> None:
            opt.zero_grad(set_to_none=True)
            dp(x).float().pow(2).mean().backward()
            opt.step()

        return fn

    model.eval()
    with torch.no_grad():
        for dp in impls.values():
            dp(x)  # builds replicas and threads
    row["replicate"] = time_interleaved(clock, {k: replicate_fn(v) for k, v in impls.items()}, settings)
    row["inference"] = time_interleaved(clock, {k: inference_fn(v) for k, v in impls.items()}, settings)
    model.train()
    row["training"] = time_interleaved(clock, {k: training_fn(v) for k, v in impls.items()}, settings)
    return row


def ratio(entry: dict, of: str, to: str) -> str:
    a, b = entry.get(of, {}).get("ms"), entry.get(to, {}).get("ms")
    return f"{a / b:.2f}x" if a and b else "n/a"


def print_rows(rows: list[dict[str, Any]], cuda: bool) -> None:
    header = ["model", "path", "what", "default ms", "trusting ms", "default/trusting"]
    if cuda:
        header += ["nn.DP ms", "default/nn.DP"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        if "error" in row:
            print(f"| {row['model']} | {row['path']} | error: {row['error']} |")
            continue
        for what in ("replicate", "inference", "training"):
            entry = row[what]
            cells = [
                row["model"],
                row["path"],
                what,
                fmt_ms(entry.get("default")),
                fmt_ms(entry.get("trusting")),
                ratio(entry, "default", "trusting"),
            ]
            if cuda:
                cells += [fmt_ms(entry.get("nn.DP")), ratio(entry, "default", "nn.DP")]
            print("| " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, "fewer iterations, no MLP on CPU")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_refresh: --device cuda, but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    clock, settings = Clock(device), Settings(args.quick, device)
    models = ["tiny", "convbn"] if args.quick and device.type == "cpu" else list(MODELS)
    rows = []
    for name in models:
        for path, ids in replica_paths(device):
            try:
                rows.append(bench(name, path, ids, device, clock, settings))
            except Exception as error:  # noqa: BLE001 - report and go on
                rows.append({"model": name, "path": path, "error": bench_dp._error_text(error)})
                with contextlib.suppress(Exception):
                    bench_dp._recover(clock)
    meta = metadata(device, args)
    print(
        f"bench_refresh on {meta.get('gpu', meta['device'])}, torch {meta['torch']}, commit {meta.get('commit')}"
        f"{' (dirty)' if meta.get('dirty') else ''}, {meta['date_utc']} UTC"
    )
    print_rows(rows, device.type == "cuda")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

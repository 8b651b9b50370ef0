#!/usr/bin/env python3
"""What synchronized BatchNorm costs: a training step through torch_dp.DataParallel with the model's BatchNorm
layers as they are (each replica normalizes its own chunk) and converted by torch_dp.convert_sync_batchnorm
(statistics over the whole batch), side by side in one run, with the plain module on the whole batch for scale.

    python benchmarks/bench_sync_bn.py [--device cpu|cuda] [--quick] [--json PATH]

The model is a small conv net with three BatchNorm2d layers (batch 32 of 3 x 32 x 32 on CPU, 128 on CUDA);
replica lists ["cpu"] * 2 and * 4, or [0, 0], [0, 0, 0, 0] and every GPU. Timing as in bench_dp.py (interleaved
rounds, medians after warm-up, CUDA events on CUDA).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_dp import (  # noqa: E402
    Clock,
    Settings,
    add_common_arguments,
    ids_label,
    metadata,
    replica_lists,
    time_interleaved,
    torch_dp,
)


def make_model() -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(3, 32),
        *block(32, 64),
        nn.MaxPool2d(2),
        *block(64, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def training_step(module: nn.Module, x: torch.Tensor) -> Any:
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        module(x).float().square().mean().backward()
        optimizer.step()

    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, "fewer iterations")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device")
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    clock, settings = Clock(device), Settings(args.quick, device)
    torch.manual_seed(0)
    x = torch.randn(128 if device.type == "cuda" else 32, 3, 32, 32, device=device)
    rows = []
    for ids in [ids for ids in replica_lists(device) if len(ids) > 1]:
        base = make_model().to(device)
        converted = torch_dp.convert_sync_batchnorm(copy.deepcopy(base))
        plain = copy.deepcopy(base)
        fns = {
            "plain": training_step(plain, x),
            "BatchNorm": training_step(torch_dp.DataParallel(base, ids), x),
            "SyncBatchNorm": training_step(torch_dp.DataParallel(converted, ids), x),
        }
        result = time_interleaved(clock, fns, settings)
        bn, sync = result["BatchNorm"].get("ms"), result["SyncBatchNorm"].get("ms")
        rows.append({"replicas": ids_label(ids), "results": result, "sync_over_bn": sync / bn if bn and sync else None})
    print(f"training step, batch {x.size(0)} x 3 x 32 x 32, {device}; ms per step (median)")
    print(f"{'replicas':<12} {'plain':>9} {'BatchNorm':>10} {'SyncBN':>9} {'SyncBN/BN':>10}")
    for row in rows:
        r = row["results"]
        cells = [f"{r[k]['ms']:.3f}" if "ms" in r[k] else "error" for k in ("plain", "BatchNorm", "SyncBatchNorm")]
        ratio = f"{row['sync_over_bn']:.2f}x" if row["sync_over_bn"] else "-"
        print(f"{row['replicas']:<12} {cells[0]:>9} {cells[1]:>10} {cells[2]:>9} {ratio:>10}")
        for name, entry in r.items():
            if "error" in entry:
                print(f"  {name}: {entry['error']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"metadata": metadata(device, args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

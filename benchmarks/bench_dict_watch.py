#!/usr/bin/env python3
"""What it costs torch_dp to find that nothing changed in a module tree between forwards: DictWatch.unchanged()
on a ResNet-50-sized tree (161 modules, 644 dicts), mean over 2,000 calls after 100 warm-up calls, and how the
answer is proven on this Python (Note [Watching a module tree] in python/csrc/dict_watch.cpp): a dict watcher
(3.12+), version tags (before 3.12), or a walk over every entry (3.13.0, whose watchers miss module attributes).

    python benchmarks/bench_dict_watch.py
"""

from __future__ import annotations

import os
import sys
import time

import torch

try:
    from torch_dp import _C
except ImportError:  # a source checkout with the module built in place (scripts/build.sh)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
    from torch_dp import _C


def main() -> int:
    blocks = [
        torch.nn.Sequential(
            torch.nn.Conv2d(8, 8, 1),
            torch.nn.BatchNorm2d(8),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 8, 3),
            torch.nn.BatchNorm2d(8),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 8, 1),
            torch.nn.BatchNorm2d(8),
            torch.nn.ReLU(),
        )
        for _ in range(16)
    ]
    modules = list(torch.nn.Sequential(*blocks).modules())
    dicts = [d for m in modules for d in (m.__dict__, m._parameters, m._buffers, m._modules)]
    watch = _C.DictWatch(dicts)
    for _ in range(100):
        assert watch.unchanged()
    calls = 2000
    start = time.perf_counter()
    for _ in range(calls):
        watch.unchanged()
    us = (time.perf_counter() - start) / calls * 1e6
    proof = "entry walk" if not watch.fast else ("dict watcher" if sys.version_info >= (3, 12) else "version tags")
    print(
        f"Python {sys.version.split()[0]}, torch {torch.__version__}: {len(modules)} modules, {len(dicts)} dicts; "
        f"nothing changed proven by {proof}: DictWatch.unchanged() {us:.2f} us per call"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

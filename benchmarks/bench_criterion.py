#!/usr/bin/env python3
"""Memory and step time of a language-model training step with the loss computed on the replicas
(torch_dp.ParallelCriterion on DataParallel.forward_scattered) against the loss on the gathered output.

    python benchmarks/bench_criterion.py [--device cpu|cuda] [--quick] [--json PATH]
        [--batch 8] [--seq 256] [--hidden 128] [--layers 2] [--vocab 16384]

The model is an embedding, `layers` x (Linear(hidden, hidden) + GELU) and a vocabulary head; the loss is
cross-entropy over batch x seq tokens (ignore_index -100 on a tenth of them). One training step is forward, loss,
backward and an SGD step, in float32, for:

  gather     torch_dp.DataParallel: logits gathered on the output device, CrossEntropyLoss on them
  criterion  torch_dp.DataParallel.forward_scattered + torch_dp.ParallelCriterion(CrossEntropyLoss)
  torch      torch.nn.DataParallel + CrossEntropyLoss on the gathered logits (CUDA only: it refuses the CPU)

Memory: on CPU, where every replica shares one memory, each variant trains a few steps in a fresh subprocess and
reports its peak RSS (ru_maxrss) and the rise of that peak over the RSS before the first step (glibc's mmap
threshold fixed at 64 KiB, so that freed tensors leave the RSS); on CUDA,
torch.cuda.max_memory_allocated per device over a few steps after reset_peak_memory_stats (in this process,
variant by variant). The gathered logits and their gradient are batch x seq x vocab x 4 bytes each (the figure
`logits_mib`): the criterion variant should stay below the gather variant by about twice that.
Time: the variants' steps interleaved in one process, medians after warm-up, as ratios to `gather`.
Device lists: ["cpu"] * 2 and ["cpu"] * 4 on CPU; [0, 0] and [0, 0, 0, 0] on CUDA, and every GPU when several.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from typing import Any, Callable, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_dp import Clock, Settings, add_common_arguments, metadata, time_interleaved, torch_dp  # noqa: E402

VARIANTS = ("gather", "criterion", "torch")


class LM(torch.nn.Module):
    def __init__(self, vocab: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.layers = torch.nn.Sequential(
            *[m for _ in range(layers) for m in (torch.nn.Linear(hidden, hidden), torch.nn.GELU())]
        )
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.embed(tokens)))  # (batch, seq, vocab)


def _flatten(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return logits.flatten(0, 1), labels.flatten()


def make_step(variant: str, ids: list[Any], args: argparse.Namespace, device: torch.device) -> Callable[[], Any]:
    """One training step of `variant` on fixed random tokens (a new model per variant, same seed)."""
    torch.manual_seed(0)
    model = LM(args.vocab, args.hidden, args.layers).to(device)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    labels[torch.rand(labels.shape, device=device) < 0.1] = -100
    loss_fn = torch.nn.CrossEntropyLoss()
    if variant == "torch":
        dp: torch.nn.Module = torch.nn.DataParallel(model, ids)
    else:
        dp = torch_dp.DataParallel(model, ids)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    criterion = torch_dp.ParallelCriterion(loss_fn, prepare=_flatten)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        if variant == "criterion":
            loss = criterion(dp.forward_scattered(tokens), labels)
        else:
            loss = loss_fn(*_flatten(dp(tokens), labels))
        loss.backward()
        opt.step()

    return step


def parse_ids(text: str) -> list[Any]:
    return [x if x == "cpu" else int(x) for x in text.split(",")]


def ids_text(ids: list[Any]) -> str:
    return ",".join(str(x) for x in ids)


# ---- memory ---------------------------------------------------------------------------------------------------


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args: argparse.Namespace) -> int:
    """--worker VARIANT --ids ...: a few steps on CPU, then the peak RSS as JSON on stdout."""
    ids = parse_ids(args.ids)
    step = make_step(args.worker, ids, args, torch.device("cpu"))
    before = rss_mib()
    for _ in range(args.steps):
        step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"peak_rss_mib": peak, "rss_before_mib": before, "rise_mib": peak - before}))
    return 0


def cpu_memory(variant: str, ids: list[Any], args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--ids", ids_text(ids)]
    command += [f"--{k}={getattr(args, k)}" for k in ("batch", "seq", "hidden", "layers", "vocab", "steps")]
    # A fixed mmap threshold: glibc then maps every tensor above 64 KiB on its own and unmaps it when freed, so the
    # peak RSS follows the peak of live memory (with its default, adaptive threshold, freed blocks stay in the
    # heap and the peak depends on fragmentation and on how many threads allocated).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, env=env)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"rc {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def cuda_memory(variant: str, ids: list[Any], args: argparse.Namespace) -> dict[str, Any]:
    devices = sorted({torch.device("cuda", i) for i in ids}, key=lambda d: d.index)
    try:
        step = make_step(variant, ids, args, devices[0])
        step()  # the first step allocates the optimizer's and replicas' state
        torch.cuda.synchronize()
        for d in devices:
            torch.cuda.reset_peak_memory_stats(d)
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        result = {f"cuda:{d.index}_peak_mib": torch.cuda.max_memory_allocated(d) / 2**20 for d in devices}
    except Exception as error:  # noqa: BLE001 - report and go on (torch.nn.DataParallel may refuse a list)
        result = {"error": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
    finally:
        step = None  # noqa: F841 - free the model before the next variant
        torch.cuda.empty_cache()
    return result


# ---- main -----------------------------------------------------------------------------------------------------


def device_lists(device: torch.device) -> list[list[Any]]:
    if device.type == "cpu":
        return [["cpu"] * 2, ["cpu"] * 4]
    lists: list[list[Any]] = [[0, 0], [0, 0, 0, 0]]
    if torch.cuda.device_count() > 1:
        lists.append(list(range(torch.cuda.device_count())))
    return lists


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, "fewer rounds and steps")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=3, help="steps measured for memory")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--ids", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    device = torch.device(args.device)
    variants = [v for v in VARIANTS if v != "torch" or device.type == "cuda"]
    logits_mib = args.batch * args.seq * args.vocab * 4 / 2**20
    print(
        f"LM: batch {args.batch} x seq {args.seq}, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; "
        f"logits {logits_mib:.0f} MiB (float32); torch {torch.__version__}; {torch.get_num_threads()} threads"
    )
    settings = Settings(args.quick, device)
    clock = Clock(device)
    rows = []
    for ids in device_lists(device):
        memory = {v: cpu_memory(v, ids, args) if device.type == "cpu" else cuda_memory(v, ids, args) for v in variants}
        steps = {
            v: make_step(v, ids, args, device if device.type == "cpu" else torch.device("cuda", 0)) for v in variants
        }
        times = time_interleaved(clock, steps, settings)
        steps.clear()
        base = times.get("gather", {}).get("ms")
        row = {"ids": ids, "memory": memory, "times": times}
        print(f"\ndevice_ids={ids}")
        for v in variants:
            t = times.get(v, {})
            ms = t.get("ms")
            ratio = f"{ms / base:.2f}x gather" if ms and base else "-"
            mem = memory[v]
            if "error" in mem:
                mem_text = f"error: {mem['error']}"
            elif device.type == "cpu":
                mem_text = f"peak RSS {mem['peak_rss_mib']:.0f} MiB (rise {mem['rise_mib']:.0f} MiB)"
            else:
                mem_text = ", ".join(f"{k[:-9]} peak {val:.0f} MiB" for k, val in mem.items())
            time_text = f"{ms:.1f} ms" if ms else t.get("error", "-")
            print(f"  {v:9s} step {time_text:>10s} ({ratio}); {mem_text}")
        if device.type == "cpu" and "error" not in memory["gather"] and "error" not in memory["criterion"]:
            saved = memory["gather"]["peak_rss_mib"] - memory["criterion"]["peak_rss_mib"]
            print(
                f"  criterion saves {saved:.0f} MiB of peak RSS (gathered logits + gradient: {2 * logits_mib:.0f} MiB)"
            )
            row["saved_mib"] = saved
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": metadata(device, args), "logits_mib": logits_mib, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

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

Memory: on CPU, where every replica shares one memory, each variant trains a few steps in a fresh subprocess,
which reports two figures. Peak RSS: VmHWM after those steps and its rise over the RSS before the first step,
with glibc's mmap threshold fixed at 64 KiB for every variant (MALLOC_ENV), so that freed tensors leave the RSS
whichever thread's arena they came from. Peak live tensor bytes: one more step under torch.profiler with
profile_memory, every CPU tensor allocation and free on every thread, the peak above what was live when the step
started; with it, where the peak was reached and the ops whose tensors of 1 MiB or more made in the step were live
then. On CUDA: torch.cuda.max_memory_allocated per device over a few steps after reset_peak_memory_stats (in this
process, variant by variant). The logits are batch x seq x vocab x 4 bytes (L, `logits_mib`). Where the replicas
share one memory (CPU, [0, 0]) the gather variant peaks in the backward at 3L (the log-probabilities saved by
cross_entropy, the gradient nll_loss passes back, the gradient of the gathered logits), the criterion variant in
the loss's forward at 2L (the replicas' logits and their log-probabilities, whose gradients the backward then
makes replica by replica): one L saved, however many replicas. Across GPUs, device 0 of the gather variant holds
the whole logits, log-probabilities and gradients, the criterion variant its own chunk's.
Time: the variants' steps interleaved in one process, medians after warm-up, as ratios to `gather`.
Device lists: ["cpu"] * 2 and ["cpu"] * 4 on CPU; [0, 0] and [0, 0, 0, 0] on CUDA, and every GPU when several.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from typing import Any, Callable

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_dp import Clock, Settings, add_common_arguments, metadata, time_interleaved, torch_dp  # noqa: E402

VARIANTS = ("gather", "criterion", "torch")
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # for the CPU subprocesses, see cpu_memory


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


def peak_rss_mib() -> float:
    """This process's peak RSS, VmHWM. Not getrusage's ru_maxrss: Linux carries the high-water mark of the memory
    a process had before execve into it, and a subprocess started with vfork (as Python's subprocess does) had
    its parent's, so ru_maxrss is at least the parent's peak RSS."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def live_tensor_peak(step: Callable[[], Any]) -> dict[str, Any]:
    """The peak of live tensor bytes during one step, independent of malloc: every CPU tensor allocation and free,
    on every thread, as torch.profiler(profile_memory=True) records them over two steps; the figure is the second
    step's peak above what was live when it started (the model and the gradients of the step before). Also where
    the peak was reached (the last allocation of 1 MiB or more before it, and whether in the backward) and which
    ops allocated the tensors of 1 MiB or more that the step made and that were live then."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for name in ("warm", "measured"):
            with record_function(f"bench_criterion.{name}"):
                step()
    allocations: list[tuple[int, int, int, Any]] = []  # (time, address, bytes, node); bytes < 0 for a free
    start = None
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            fields = node.extra_fields
            allocations.append((node.start_time_ns, fields.ptr, fields.alloc_size, node))
        elif node.name == "bench_criterion.measured":
            start = node.start_time_ns
        stack.extend(node.children)
    allocations.sort(key=lambda a: a[0])
    live: dict[int, tuple[int, int, Any]] = {}  # address -> (bytes, time, node)
    total = 0
    base = peak = None
    held: dict[int, tuple[int, int, Any]] = {}
    last_big = where = None
    for time, address, size, node in allocations:
        if base is None and start is not None and time >= start:
            base = peak = total
            held = dict(live)
        if size > 0:
            live[address] = (size, time, node)
            last_big = node if size >= 2**20 else last_big
        else:
            live.pop(address, None)
        total += size
        if base is not None and total > peak:
            peak, held, where = total, dict(live), last_big
    if base is None or peak is None:
        return {"live_error": "no allocation recorded"}
    by_op: dict[str, int] = {}
    for size, time, node in held.values():
        if size >= 2**20 and time >= start:
            name = node.parent.name if node.parent is not None else "?"
            by_op[name] = by_op.get(name, 0) + size
    return {
        "live_peak_mib": (peak - base) / 2**20,
        "live_peak_at": _where(where),
        "live_at_peak_mib": {op: size / 2**20 for op, size in sorted(by_op.items(), key=lambda kv: -kv[1])},
    }


def _where(node: Any) -> str:
    """The op that allocated, and "backward" when it ran in the autograd engine."""
    if node is None:
        return "?"
    names = []
    parent = node.parent
    while parent is not None:
        names.append(parent.name)
        parent = parent.parent
    phase = "backward" if any(n.startswith("autograd::engine::evaluate_function") for n in names) else "forward"
    return f"{phase}, {names[0] if names else '?'}"


def worker(args: argparse.Namespace) -> int:
    """--worker VARIANT --ids ...: a few steps on CPU, the peak RSS over them, then the peak of live tensor bytes
    over one more step under the profiler (after the RSS was read: the profiler's own records take memory), as
    JSON on stdout."""
    ids = parse_ids(args.ids)
    step = make_step(args.worker, ids, args, torch.device("cpu"))
    before = rss_mib()
    for _ in range(args.steps):
        step()
    peak = peak_rss_mib()
    result = {"peak_rss_mib": peak, "rss_before_mib": before, "rise_mib": peak - before}
    try:
        result.update(live_tensor_peak(step))
    except Exception as error:  # noqa: BLE001 - an experimental profiler API: keep the RSS figure without it
        result["live_error"] = f"{type(error).__name__}: {error}"
    print(json.dumps(result))
    return 0


def cpu_memory(variant: str, ids: list[Any], args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--ids", ids_text(ids)]
    command += [f"--{k}={getattr(args, k)}" for k in ("batch", "seq", "hidden", "layers", "vocab", "steps")]
    # A fixed mmap threshold, the same for every variant: glibc then maps every tensor above 64 KiB on its own and
    # unmaps it when freed, so the peak RSS follows the peak of live memory (with its default, adaptive threshold,
    # freed blocks stay in the heap or in a worker thread's arena, and the peak depends on fragmentation and on
    # how many threads allocated). The live-tensor figure does not depend on it.
    env = {**os.environ, **MALLOC_ENV}
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, env=env)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"rc {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def cuda_memory(variant: str, ids: list[Any], args: argparse.Namespace) -> dict[str, Any]:
    devices = sorted({torch.device("cuda", i) for i in ids}, key=lambda d: d.index)
    gc.collect()  # a DataParallel of the variant before holds reference cycles: free its tensors first
    torch.cuda.empty_cache()
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
        gc.collect()
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


def main(argv: list[str] | None = None) -> int:
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
        f"logits L = {logits_mib:.0f} MiB, logits + gradient 2L = {2 * logits_mib:.0f} MiB (float32); "
        f"torch {torch.__version__}; {torch.get_num_threads()} threads"
    )
    if device.type == "cpu":
        malloc = " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items())
        print(
            f"memory: a subprocess per variant, {args.steps} steps; peak RSS (VmHWM) with {malloc}, and the peak "
            "of live tensor bytes in one more step (torch.profiler, malloc-independent)"
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
        gc.collect()
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
                if "live_peak_mib" in mem:
                    held = ", ".join(f"{size:.0f} {op}" for op, size in mem["live_at_peak_mib"].items())
                    mem_text += (
                        f"; live tensors: peak {mem['live_peak_mib']:.0f} MiB, reached in the "
                        f"{mem['live_peak_at']}, holding {held}"
                    )
                else:
                    mem_text += f"; live tensors: {mem.get('live_error', '-')}"
            else:
                mem_text = ", ".join(f"{k[:-9]} peak {val:.0f} MiB" for k, val in mem.items())
            time_text = f"{ms:.1f} ms" if ms else t.get("error", "-")
            print(f"  {v:9s} step {time_text:>10s} ({ratio}); {mem_text}")
        gathered, scattered = memory["gather"], memory["criterion"]
        if "error" not in gathered and "error" not in scattered:
            if device.type == "cpu":
                saved = {"rss": gathered["peak_rss_mib"] - scattered["peak_rss_mib"]}
                if "live_peak_mib" in gathered and "live_peak_mib" in scattered:
                    saved["live"] = gathered["live_peak_mib"] - scattered["live_peak_mib"]
                text = f"{saved['rss']:.0f} MiB of peak RSS" + (
                    f", {saved['live']:.0f} MiB of peak live tensor bytes" if "live" in saved else ""
                )
            else:
                saved = {k[:-9]: gathered[k] - scattered[k] for k in gathered if k in scattered}
                text = ", ".join(f"{k}: {val:.0f} MiB of peak allocated" for k, val in saved.items())
            print(f"  criterion saves {text} (L = {logits_mib:.0f} MiB, 2L = {2 * logits_mib:.0f} MiB)")
            row["saved_mib"] = saved
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": metadata(device, args), "logits_mib": logits_mib, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

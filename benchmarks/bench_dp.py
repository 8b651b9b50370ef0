#!/usr/bin/env python3
"""Side-by-side speed benchmark: plain module, the ideal, torch.nn.DataParallel and torch_dp.DataParallel.

    python benchmarks/bench_dp.py [--device cpu|cuda] [--quick] [--json PATH] [--models tiny,mlp,resnet50]

For every model (Linear(5, 2) batch 30, an MLP of 8 x Linear(1024, 1024) batch 256, torchvision ResNet-50 batch
64 when torchvision imports), mode (inference: eval() + no_grad; training: forward + backward + SGD step) and
replica list ([0], [0, 0], [0, 0, 0, 0] and every GPU on CUDA; ["cpu"] * k on CPU), one run times:

  plain     the module on the whole batch
  ideal     the same chunks DataParallel would make, issued one after another through the plain module
  nn.DP     torch.nn.DataParallel(module, device_ids)
  torch_dp  torch_dp.DataParallel(module, device_ids), the default issuing="auto" (the table says which way it
            settled on; Note [Issuing replicas])
  threads, serial   the same with issuing="threads" and issuing="serial"
  streams   (CUDA inference, one GPU) the ideal's chunks from one thread, one CUDA stream per chunk: whether
            the GPU could overlap replicas that share it

The variants of one configuration are timed interleaved (round-robin, rotating order) so that drift on a noisy
machine hits all of them alike; each figure is the median over rounds of a block's mean time per iteration,
after warm-up. On CUDA a block is timed with CUDA events on the current stream (device-side) and the peak
memory of one iteration is torch.cuda.max_memory_allocated. On CPU, torch.nn.DataParallel rejects "cpu"
device ids and, without an accelerator, only calls the module: its cells say n/a, and its passthrough is timed
for Linear(5, 2) in a row of its own, labelled as such.

Then the pieces of torch_dp.DataParallel are timed on their own, through the DataParallel's own methods:
dp.scatter, dp.replicate with nothing changed, dp.replicate right after an optimizer step, dp.parallel_apply,
dp.gather (and torch.nn.DataParallel's same methods on CUDA, for comparison).

A configuration that fails prints its error in its row and the run goes on. --quick: fewer iterations, and on
CPU no ResNet-50 (it takes seconds per iteration there). The JSON file holds every figure and the metadata.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any, Callable

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
    import torch_dp
except ImportError:  # run from a source checkout with the module built in place (scripts/build.sh)
    sys.path.insert(0, os.path.join(REPO, "python"))
    import torch_dp

try:
    import torchvision
except Exception:  # noqa: BLE001 - any import failure means "no ResNet-50"
    torchvision = None


# ---- models ------------------------------------------------------------------------------------------------


def make_tiny() -> tuple[torch.nn.Module, tuple[int, ...]]:
    return torch.nn.Linear(5, 2), (30, 5)


def make_mlp() -> tuple[torch.nn.Module, tuple[int, ...]]:
    layers: list[torch.nn.Module] = []
    for i in range(8):
        layers.append(torch.nn.Linear(1024, 1024))
        if i < 7:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers), (256, 1024)


def make_resnet50() -> tuple[torch.nn.Module, tuple[int, ...]]:
    if torchvision is None:
        raise RuntimeError("torchvision is not installed")
    return torchvision.models.resnet50(), (64, 3, 224, 224)


MODELS: dict[str, tuple[str, Callable[[], tuple[torch.nn.Module, tuple[int, ...]]]]] = {
    "tiny": ("Linear(5,2) b30", make_tiny),
    "mlp": ("MLP 8x1024 b256", make_mlp),
    "resnet50": ("ResNet-50 b64", make_resnet50),
}


def loss_of(out: torch.Tensor, scale: float) -> torch.Tensor:
    # A sum (scaled by the whole batch's size), so that the ideal's per-chunk losses add up to the whole loss.
    return out.float().pow(2).sum() * scale


# ---- timing ------------------------------------------------------------------------------------------------


class Clock:
    """Times blocks of calls: CUDA events on the current stream on CUDA (device-side), perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def block(self, fn: Callable[[], Any], k: int) -> float:
        """Mean ms per call over k calls."""
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(k):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / k
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        return (time.perf_counter() - t0) * 1e3 / k

    def once(self, fn: Callable[[], Any], setup: Callable[[], Any] | None = None) -> float:
        """ms of one call, with setup() done and the device idle before the clock starts."""
        if setup is not None:
            setup()
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return (time.perf_counter() - t0) * 1e3


class Settings:
    def __init__(self, quick: bool, device: torch.device) -> None:
        self.quick = quick
        self.warmup = 3 if quick else 10  # warm-up calls, fewer where they would take longer than warmup_s
        self.warmup_s = 0.3 if quick else 1.0
        self.rounds = 7 if quick else 21  # timed blocks per variant, fewer (not under 3) beyond budget_s
        self.budget_s = 1.0 if quick else 4.0
        self.min_rounds = 3
        # Target length of one timed block: long enough to hide the clock, short enough for many rounds.
        self.block_ms = 2.0 if quick else 10.0
        if device.type == "cuda":
            self.block_ms *= 2

    def rounds_for(self, block_ms: float) -> int:
        return max(self.min_rounds, min(self.rounds, int(self.budget_s * 1e3 / max(block_ms, 1e-3))))


def warm_up(fn: Callable[[], Any], settings: Settings) -> None:
    t0 = time.perf_counter()
    for i in range(settings.warmup):
        fn()
        if i >= 1 and time.perf_counter() - t0 > settings.warmup_s:
            break


def _median_stats(samples: list[float]) -> dict[str, Any]:
    s = sorted(samples)
    q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
    return {"ms": statistics.median(s), "min_ms": s[0], "p25_ms": q[0], "p75_ms": q[2], "rounds": len(s)}


def time_interleaved(clock: Clock, fns: dict[str, Callable[[], Any]], settings: Settings) -> dict[str, dict[str, Any]]:
    """Warm-up, then rounds of one block per variant (rotating order); per variant the median ms per call.
    A variant that raises is dropped from the rounds and reported with its error."""
    results: dict[str, dict[str, Any]] = {}
    live: dict[str, tuple[Callable[[], Any], int]] = {}
    rounds = settings.rounds
    for name, fn in fns.items():
        try:
            warm_up(fn, settings)
            one = max(clock.block(fn, 1), 1e-3)
            k = max(1, min(1000, int(round(settings.block_ms / one))))
            live[name] = (fn, k)
            rounds = min(rounds, settings.rounds_for(k * one))
        except Exception as error:  # noqa: BLE001 - report and go on
            results[name] = {"error": _error_text(error)}
            _recover(clock)
    samples: dict[str, list[float]] = {name: [] for name in live}
    names = list(live)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)] if names else []:
            if name in results:
                continue
            fn, k = live[name]
            try:
                samples[name].append(clock.block(fn, k))
            except Exception as error:  # noqa: BLE001
                results[name] = {"error": _error_text(error)}
                _recover(clock)
    for name in names:
        if name not in results:
            results[name] = {**_median_stats(samples[name]), "calls_per_block": live[name][1]}
    return results


def peak_memory_mib(clock: Clock, fn: Callable[[], Any], reset: Callable[[], Any]) -> float | None:
    """Peak CUDA memory (MiB, device 0) while fn runs once, from a state where reset() has freed gradients."""
    if not clock.cuda:
        return None
    reset()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def _error_text(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip().splitlines()
    return text[0][:300] if text else type(error).__name__


def _recover(clock: Clock) -> None:
    if clock.cuda:
        with contextlib.suppress(Exception):
            torch.cuda.synchronize()
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()


# ---- configurations ----------------------------------------------------------------------------------------


def replica_lists(device: torch.device) -> list[list[Any]]:
    if device.type == "cuda":
        lists: list[list[Any]] = [[0], [0, 0], [0, 0, 0, 0]]
        n = torch.cuda.device_count()
        if n > 1:
            lists.append(list(range(n)))
        return lists
    return [["cpu"], ["cpu"] * 2, ["cpu"] * 4]


def ids_label(ids: list[Any]) -> str:
    if ids and all(isinstance(d, str) and d == "cpu" for d in ids):
        return f"cpu x{len(ids)}"
    return "[" + ",".join(str(d) for d in ids) + "]"


NN_DP_CPU_NOTE = (
    "n/a: torch.nn.DataParallel does not accept 'cpu' device ids; without an accelerator it only calls the "
    "module (timed for Linear(5,2) in the 'passthrough' row)"
)


VARIANTS = ("plain", "ideal", "nn.DP", "torch_dp", "dp threads", "dp serial", "streams")
AUTO_TRIAL_CALLS = 60  # more than the 2 warm-up calls and 4 blocks of 12 that issuing="auto" may need to settle


def settled_issuing(dp: torch_dp.DataParallel) -> str:
    """What issuing="auto" uses now: "threads" or "serial", or "auto" while still measuring."""
    resolved = torch_dp._C.resolve_issuing(torch_dp._C.Issuing.auto, dp._devices)
    return (dp._get_engine().pool.settled_auto_issuing if resolved == torch_dp._C.Issuing.auto else resolved).name


def bench_config(
    model: torch.nn.Module,
    x: torch.Tensor,
    mode: str,
    ids: list[Any] | None,
    device: torch.device,
    clock: Clock,
    settings: Settings,
) -> dict[str, Any]:
    """One row: every variant on one (model, mode, replica list). ids None: the CPU passthrough row."""
    training = mode == "training"
    model.train(training)
    scale = 1.0 / x.numel()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4) if training else None
    grad_ctx = contextlib.nullcontext if training else torch.no_grad
    wrappers: dict[str, torch.nn.Module | None] = {"plain": model}
    notes: dict[str, str] = {}
    errors: dict[str, str] = {}
    chunks: list[torch.Tensor] = []
    if ids is None:
        wrappers["nn.DP"] = torch.nn.DataParallel(model)  # no accelerator: a passthrough
        notes["nn.DP"] = "passthrough: no accelerator, torch.nn.DataParallel calls the module directly"
    else:
        chunks = list(x.chunk(len(ids)))
        wrappers["ideal"] = model
        if device.type == "cuda":
            try:
                wrappers["nn.DP"] = torch.nn.DataParallel(model, device_ids=ids)
            except Exception as error:  # noqa: BLE001
                errors["nn.DP"] = _error_text(error)
        else:
            notes["nn.DP"] = NN_DP_CPU_NOTE
        try:
            wrappers["torch_dp"] = torch_dp.DataParallel(model, device_ids=ids)
        except Exception as error:  # noqa: BLE001
            errors["torch_dp"] = _error_text(error)
        if device.type == "cuda" and not training and len(ids) > 1 and len(set(ids)) == 1:
            # An experiment for Note [Issuing replicas]: the chunks from one thread, each on its own stream,
            # so the GPU may overlap them (torch_dp issues same-GPU replicas on the one current stream).
            wrappers["streams"] = model
            notes["streams"] = "the ideal's chunks from one thread, one CUDA stream per chunk"
        if len(ids) > 1 and "torch_dp" in wrappers:
            # Both issuing modes forced, timed alongside the default (Note [Issuing replicas]).
            for issuing in ("threads", "serial"):
                wrappers[f"dp {issuing}"] = torch_dp.DataParallel(model, device_ids=ids, issuing=issuing)

    def make_fn(name: str, wrapper: torch.nn.Module) -> Callable[[], Any]:
        if name == "ideal":
            if training:

                def ideal_step() -> None:
                    opt.zero_grad(set_to_none=True)
                    loss = sum(loss_of(model(c), scale) for c in chunks)
                    loss.backward()
                    opt.step()

                return ideal_step

            def ideal_infer() -> None:
                with torch.no_grad():
                    for c in chunks:
                        model(c)

            return ideal_infer
        if name == "streams":
            streams = [torch.cuda.Stream(device) for _ in chunks]

            def streams_infer() -> None:
                main = torch.cuda.current_stream(device)
                with torch.no_grad():
                    for c, stream in zip(chunks, streams):
                        stream.wait_stream(main)
                        with torch.cuda.stream(stream):
                            model(c)
                    for stream in streams:
                        main.wait_stream(stream)

            return streams_infer
        if training:

            def step() -> None:
                opt.zero_grad(set_to_none=True)
                loss_of(wrapper(x), scale).backward()
                opt.step()

            return step

        def infer() -> None:
            with torch.no_grad():
                wrapper(x)

        return infer

    fns = {name: make_fn(name, w) for name, w in wrappers.items() if w is not None and name not in errors}
    order = [n for n in VARIANTS if n in fns]
    if "torch_dp" in fns and ids is not None and len(ids) > 1:
        # issuing="auto" times both ways over its first forwards (Note [Issuing replicas]); time it once settled.
        for _ in range(AUTO_TRIAL_CALLS):
            if settled_issuing(wrappers["torch_dp"]) != "auto":
                break
            fns["torch_dp"]()
    timed = time_interleaved(clock, {n: fns[n] for n in order}, settings)
    if "torch_dp" in timed and ids is not None and len(ids) > 1:
        notes["torch_dp"] = f"issuing: auto settled on {settled_issuing(wrappers['torch_dp'])}"
    row: dict[str, Any] = {"variants": {}}
    for name in VARIANTS:
        if name in errors:
            row["variants"][name] = {"error": errors[name]}
        elif name in timed:
            entry = dict(timed[name])
            if name in notes:
                entry["note"] = notes[name]
            row["variants"][name] = entry
        elif name in notes:
            row["variants"][name] = {"na": notes[name]}
    if clock.cuda:
        for name in order:
            entry = row["variants"][name]
            if "error" in entry:
                continue
            try:
                with grad_ctx():
                    entry["peak_mib"] = peak_memory_mib(
                        clock, fns[name], lambda: opt.zero_grad(set_to_none=True) if opt else None
                    )
            except Exception as error:  # noqa: BLE001
                entry["peak_error"] = _error_text(error)
                _recover(clock)
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    v = row["variants"]

    def ms(name: str) -> float | None:
        return v.get(name, {}).get("ms")

    ratios = {}
    if ms("torch_dp") and ms("plain"):
        ratios["torch_dp/plain"] = ms("torch_dp") / ms("plain")
    if ms("torch_dp") and ms("ideal"):
        ratios["torch_dp/ideal"] = ms("torch_dp") / ms("ideal")
    if ms("nn.DP") and ms("torch_dp") and ids is not None:
        ratios["nn.DP/torch_dp"] = ms("nn.DP") / ms("torch_dp")
    if ms("nn.DP") and ms("plain"):
        ratios["nn.DP/plain"] = ms("nn.DP") / ms("plain")
    for issuing in ("threads", "serial"):
        if ms(f"dp {issuing}") and ms("ideal"):
            ratios[f"{issuing}/ideal"] = ms(f"dp {issuing}") / ms("ideal")
    row["ratios"] = ratios
    del wrappers, fns
    _recover(clock)
    return row


# ---- pieces ------------------------------------------------------------------------------------------------


def _bench_pieces_of(
    dp: torch.nn.Module,
    model: torch.nn.Module,
    x: torch.Tensor,
    opt: torch.optim.Optimizer,
    grad_ctx: Callable[[], Any],
    clock: Clock,
    settings: Settings,
) -> dict[str, Any]:
    """bench_pieces for one implementation (torch_dp's or torch.nn.DataParallel's) wrapped around model."""
    pieces: dict[str, Any] = {}

    def run(piece: str, fn: Callable[[], Any], setup: Callable[[], Any] | None = None) -> None:
        try:
            with grad_ctx():
                if setup is None:
                    warm_up(fn, settings)
                    one = max(clock.block(fn, 1), 1e-3)
                    k = max(1, min(1000, int(round(settings.block_ms / one))))
                    samples = [clock.block(fn, k) for _ in range(settings.rounds_for(k * one))]
                    pieces[piece] = {**_median_stats(samples), "calls_per_block": k}
                else:  # one call at a time, setup() outside the clock
                    warm_up(lambda: (setup(), fn()), settings)
                    one = max(clock.once(fn, setup), 1e-3)
                    samples = [clock.once(fn, setup) for _ in range(settings.rounds_for(one))]
                    pieces[piece] = {**_median_stats(samples), "calls_per_block": 1}
        except Exception as error:  # noqa: BLE001
            pieces[piece] = {"error": _error_text(error)}
            _recover(clock)

    try:
        with grad_ctx():
            warm_up(lambda: dp(x), settings)  # builds torch_dp's replicas and worker threads
            inputs, kwargs = dp.scatter((x,), {}, dp.device_ids)
            replicas = dp.replicate(dp.module, dp.device_ids[: len(inputs)])
            outputs = dp.parallel_apply(replicas, inputs, kwargs)
    except Exception as error:  # noqa: BLE001
        pieces["error"] = _error_text(error)
        _recover(clock)
        return pieces
    used = dp.device_ids[: len(inputs)]
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3

    run("scatter", lambda: dp.scatter((x,), {}, dp.device_ids))
    run("replicate (unchanged)", lambda: dp.replicate(dp.module, used))
    run("replicate (after optimizer step)", lambda: dp.replicate(dp.module, used), setup=opt.step)
    run("parallel_apply", lambda: dp.parallel_apply(replicas, inputs, kwargs))
    run("gather", lambda: dp.gather(outputs, dp.output_device))
    run("forward (whole)", lambda: dp(x))
    # Returning drops the lambdas above (all already run) and their tensors: this configuration's memory is freed.
    return pieces


def bench_pieces(
    model: torch.nn.Module,
    x: torch.Tensor,
    mode: str,
    ids: list[Any],
    device: torch.device,
    clock: Clock,
    settings: Settings,
) -> dict[str, Any]:
    """dp.scatter, dp.replicate (unchanged / after an optimizer step), dp.parallel_apply, dp.gather, and the
    whole forward, each on its own; torch.nn.DataParallel's same methods on CUDA."""
    training = mode == "training"
    model.train(training)
    grad_ctx = contextlib.nullcontext if training else torch.no_grad
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    impls: dict[str, torch.nn.Module] = {"torch_dp": torch_dp.DataParallel(model, device_ids=ids)}
    if device.type == "cuda":
        impls["nn.DP"] = torch.nn.DataParallel(model, device_ids=ids)
    result = {
        impl_name: _bench_pieces_of(dp, model, x, opt, grad_ctx, clock, settings) for impl_name, dp in impls.items()
    }
    opt.zero_grad(set_to_none=True)
    del impls
    _recover(clock)
    return result


# ---- output ------------------------------------------------------------------------------------------------


def fmt_ms(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "-"
    if "error" in entry:
        return "ERROR"
    if "na" in entry:
        return "n/a"
    ms = entry["ms"]
    return f"{ms:.4f}" if ms < 0.1 else f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_table(rows: list[dict[str, Any]], cuda: bool) -> None:
    header = [
        "model",
        "mode",
        "replicas",
        "plain ms",
        "ideal ms",
        "nn.DP ms",
        "torch_dp ms",
        "dp/plain",
        "dp/ideal",
        "nnDP/dp",
        "auto uses",
        "threads ms",
        "serial ms",
    ]
    if cuda:
        header += ["streams ms", "peak MiB plain", "peak MiB nn.DP", "peak MiB torch_dp"]
    lines = [header]
    notes: list[str] = []
    for row in rows:
        if "error" in row:
            lines.append([row["model"], row["mode"], row["replicas"], f"ERROR: {row['error']}"])
            continue
        v, r = row["variants"], row["ratios"]
        line = [
            row["model"],
            row["mode"],
            row["replicas"],
            fmt_ms(v.get("plain")),
            fmt_ms(v.get("ideal")),
            fmt_ms(v.get("nn.DP")),
            fmt_ms(v.get("torch_dp")),
            fmt_ratio(r.get("torch_dp/plain")),
            fmt_ratio(r.get("torch_dp/ideal")),
            fmt_ratio(r.get("nn.DP/torch_dp")),
            v.get("torch_dp", {}).get("note", "-").replace("issuing: auto settled on ", ""),
            fmt_ms(v.get("dp threads")),
            fmt_ms(v.get("dp serial")),
        ]
        if cuda:
            line.append(fmt_ms(v.get("streams")))
            for name in ("plain", "nn.DP", "torch_dp"):
                peak = v.get(name, {}).get("peak_mib")
                line.append("-" if peak is None else f"{peak:.0f}")
        lines.append(line)
        for name, entry in v.items():
            if "error" in entry:
                notes.append(f"  {row['model']} / {row['mode']} / {row['replicas']} / {name}: {entry['error']}")
    widths = [max(len(str(line[i])) for line in lines if i < len(line)) for i in range(len(header))]
    for n, line in enumerate(lines):
        if len(line) < len(header):  # an error row
            print("| " + " | ".join(str(c).ljust(widths[i]) for i, c in enumerate(line[:3])) + " | " + line[3])
        else:
            print("| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    if not cuda:
        print("nn.DP n/a: torch.nn.DataParallel does not accept 'cpu' device ids; without an accelerator it calls")
        print("the module directly, timed for Linear(5,2) in the 'passthrough' rows (not a comparison).")
    if notes:
        print("errors:")
        print("\n".join(notes))


def print_pieces(pieces: list[dict[str, Any]]) -> None:
    names = [
        "scatter",
        "replicate (unchanged)",
        "replicate (after optimizer step)",
        "parallel_apply",
        "gather",
        "forward (whole)",
    ]
    header = ["model", "mode", "replicas", "impl"] + [n.replace("replicate ", "repl. ") for n in names]
    lines = [header]
    for entry in pieces:
        for impl, result in entry.get("impls", {}).items():
            if "error" in result:
                lines.append(
                    [entry["model"], entry["mode"], entry["replicas"], impl, f"ERROR: {result['error']}"]
                    + [""] * (len(names) - 1)
                )
                continue
            lines.append(
                [entry["model"], entry["mode"], entry["replicas"], impl] + [fmt_ms(result.get(n)) for n in names]
            )
        if "error" in entry:
            lines.append(
                [entry["model"], entry["mode"], entry["replicas"], "-", f"ERROR: {entry['error']}"]
                + [""] * (len(names) - 1)
            )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    for n, line in enumerate(lines):
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for entry in pieces:
        for impl, result in entry.get("impls", {}).items():
            for n in names:
                if "error" in result.get(n, {}):
                    print(
                        f"  {entry['model']} / {entry['mode']} / {entry['replicas']} / {impl} / {n}: "
                        f"{result[n]['error']}"
                    )


def metadata(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "device": str(device),
        "torch": torch.__version__,
        "torchvision": getattr(torchvision, "__version__", None),
        "torch_dp": getattr(torch_dp, "__version__", None),
        "torch_dp_path": os.path.dirname(torch_dp.__file__),
        "python": platform.python_version(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "quick": args.quick,
        "argv": sys.argv,
    }
    try:
        meta["commit"] = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        meta["dirty"] = bool(dirty)
    except Exception:  # noqa: BLE001 - no git there
        meta["commit"] = None
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
        meta["gpu_count"] = torch.cuda.device_count()
        meta["cuda"] = torch.version.cuda
        with contextlib.suppress(Exception):  # settings that newer torch versions rename
            meta["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
            meta["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return meta


# ---- main --------------------------------------------------------------------------------------------------


def add_common_arguments(parser: argparse.ArgumentParser, quick_help: str) -> None:
    """--device, --quick and --json, as every benchmark script takes them."""
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json", metavar="PATH", help="write every figure and the metadata there")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, "few iterations; on CPU no ResNet-50")
    parser.add_argument("--models", help="comma-separated subset of: " + ",".join(MODELS))
    parser.add_argument("--modes", default="inference,training", help="comma-separated: inference,training")
    parser.add_argument("--no-pieces", action="store_true", help="skip timing scatter/replicate/... on their own")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (intra-op threads); default: torch's")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_dp: --device cuda, but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        with contextlib.suppress(Exception):
            torch.set_flush_denormal(True)
    if args.models:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = [m for m in models if m not in MODELS]
        if unknown:
            parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    else:
        models = ["tiny", "mlp"]
        if torchvision is not None and not (args.quick and device.type == "cpu"):
            models.append("resnet50")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    settings = Settings(args.quick, device)
    clock = Clock(device)
    meta = metadata(device, args)
    print(
        f"bench_dp: {meta['date_utc']} UTC, device {meta.get('gpu', 'cpu')}, torch {meta['torch']}, "
        f"torch_dp {meta['torch_dp']} at commit {meta.get('commit')}{' (dirty)' if meta.get('dirty') else ''}, "
        f"{meta['cpu_count']} CPUs, {meta['torch_threads']} torch threads, quick={args.quick}"
    )
    if torchvision is None and "resnet50" not in models:
        print("bench_dp: torchvision is not installed: no ResNet-50")
    print(
        f"timing: median over {settings.rounds} rounds of interleaved blocks (~{settings.block_ms:g} ms each) "
        f"after {settings.warmup} warm-up calls; "
        + ("CUDA events on the current stream" if clock.cuda else "perf_counter")
        + "\n",
        flush=True,
    )

    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    pieces: list[dict[str, Any]] = []
    torch.manual_seed(0)
    for model_key in models:
        label = MODELS[model_key][0]
        try:
            model, shape = MODELS[model_key][1]()
            model = model.to(device)
            x = torch.randn(*shape, device=device)
        except Exception as error:  # noqa: BLE001
            rows.append({"model": label, "mode": "-", "replicas": "-", "error": _error_text(error)})
            print(f"{label}: ERROR {_error_text(error)}", flush=True)
            continue
        for mode in modes:
            id_lists: list[list[Any] | None] = list(replica_lists(device))
            if device.type == "cpu" and model_key == "tiny":
                id_lists.insert(0, None)  # torch.nn.DataParallel's passthrough: its overhead, not a comparison
            for ids in id_lists:
                replicas = "passthrough" if ids is None else ids_label(ids)
                t0 = time.perf_counter()
                try:
                    row = bench_config(model, x, mode, ids, device, clock, settings)
                except Exception as error:  # noqa: BLE001
                    row = {"error": _error_text(error), "traceback": traceback.format_exc()}
                    _recover(clock)
                row.update(
                    model=label,
                    model_key=model_key,
                    mode=mode,
                    replicas=replicas,
                    device_ids=None if ids is None else [str(d) for d in ids],
                )
                rows.append(row)
                summary = row.get("error") or "  ".join(f"{k} {fmt_ms(e)}" for k, e in row["variants"].items())
                print(f"  {label} / {mode} / {replicas}: {summary}  ({time.perf_counter() - t0:.1f} s)", flush=True)
        if not args.no_pieces:
            for mode in modes:
                for ids in replica_lists(device):
                    if len(ids) < 2:
                        continue
                    entry: dict[str, Any] = {
                        "model": label,
                        "model_key": model_key,
                        "mode": mode,
                        "replicas": ids_label(ids),
                    }
                    try:
                        entry["impls"] = bench_pieces(model, x, mode, ids, device, clock, settings)
                    except Exception as error:  # noqa: BLE001
                        entry["error"] = _error_text(error)
                        _recover(clock)
                    pieces.append(entry)
            print(f"  {label}: pieces done", flush=True)
        del model, x
        _recover(clock)

    elapsed = time.perf_counter() - started
    print(
        f"\n## side by side ({meta.get('gpu', 'CPU')}, torch {meta['torch']}, {meta['date_utc']} UTC, "
        f"commit {meta.get('commit')}; ms per iteration, medians)\n"
    )
    print_table(rows, clock.cuda)
    if pieces:
        print(
            "\n## torch_dp's pieces on their own (ms per call, medians"
            + (", nn.DP = torch.nn.DataParallel's same methods" if clock.cuda else "")
            + ")\n"
        )
        print_pieces(pieces)
    print(f"\nbench_dp: {elapsed:.1f} s")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(
                {"meta": {**meta, "elapsed_s": elapsed, "settings": vars(settings)}, "rows": rows, "pieces": pieces},
                f,
                indent=1,
            )
        print(f"bench_dp: wrote {args.json}")
    # Failures are reported in their rows; the exit status says only whether nothing at all could be timed.
    timed = any("ms" in e for r in rows for e in r.get("variants", {}).values())
    return 0 if timed else 1


if __name__ == "__main__":
    sys.exit(main())

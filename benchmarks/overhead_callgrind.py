#!/usr/bin/env python3
"""Per-forward CPU overhead of torch_dp.DataParallel over the plain module, in instructions (callgrind) and in
a wall-clock ratio measured in one run.

    python benchmarks/overhead_callgrind.py [--model tiny|deep|steps] [--n 200] [--replicas 2] [--json PATH]
                                            [--no-wall]

Instructions are counted with `valgrind --tool=callgrind`, under torch.no_grad() with one intra-op thread, for
  plain              the module on the whole batch,
  python wrapper     an nn.Module whose forward calls the module: the floor of any wrapper written in Python,
  ideal xk           the k chunks DataParallel makes, one after another through the module (same compute),
  torch_dp cpu xk    torch_dp.DataParallel(module, ["cpu"] * k),
with --model tiny (default): Linear(5, 2), batch 30, where everything but the matmul is overhead; or --model deep:
a module tree the size of ResNet-50's with tiny tensors, where per-module work (watching the tree, installing
replica tensors) shows; or --model steps: the steps of the tiny forward (the profiler event, the checks, the
split, and for two replicas the replicas, their run and the gather), each called on its own, which shows where the
overhead goes (it uses torch_dp's internals, so it measures this checkout). Each variant runs n and then 2n
forwards between zeroing and dumping callgrind's counters, and (I(2n) - I(n)) / n is its count per forward:
start-up, warm-up and the cost of switching the counters on and off cancel. Every thread is counted, so the
replicas' worker threads are included. Instruction counts barely move with machine load (0.1 % between runs here),
which makes them the figure to watch for regressions; the wall-clock ratio (the variants interleaved in one
process, medians) shows what they mean in time on the machine at hand, and is as noisy as that machine.

Counting switches on only around the measured loops: a 5-line helper built with the system C compiler issues
callgrind's client requests (CALLGRIND_START_INSTRUMENTATION, ...), so Python and torch start up without
instrumentation. Without a C compiler or valgrind's headers it falls back to torch's own toggles
(torch._C._valgrind_toggle) with every instruction instrumented, which is several times slower.

Exit status 0 with results, 2 when valgrind is missing (the message says so).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HELPER_C = r"""
#include <valgrind/callgrind.h>
void cg_start(void) { CALLGRIND_START_INSTRUMENTATION; }
void cg_stop(void) { CALLGRIND_STOP_INSTRUMENTATION; }
void cg_zero(void) { CALLGRIND_ZERO_STATS; }
void cg_dump(void) { CALLGRIND_DUMP_STATS; }
int cg_running(void) { return RUNNING_ON_VALGRIND; }
"""


def _import_torch_dp():
    try:
        import torch_dp
    except ImportError:  # a source checkout with the module built in place
        sys.path.insert(0, os.path.join(REPO, "python"))
        import torch_dp
    return torch_dp


def build_helper(directory: str) -> str | None:
    """The client-request helper as a shared library, or None where it cannot be built."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    source = os.path.join(directory, "cg_helper.c")
    library = os.path.join(directory, "cg_helper.so")
    with open(source, "w") as f:
        f.write(HELPER_C)
    result = subprocess.run(
        [compiler, "-O1", "-shared", "-fPIC", source, "-o", library], capture_output=True, text=True
    )
    return library if result.returncode == 0 else None


MODELS = {
    "tiny": "Linear(5, 2), batch 30",
    "deep": "a module tree the size of ResNet-50's (53 x Conv2d(4, 4, 1) + BatchNorm2d + ReLU: 213 modules, "
    "318 tensors) on a 30 x 4 x 2 x 2 batch, in eval mode",
    "steps": "the steps of torch_dp's forward of Linear(5, 2), batch 30, each called on its own",
}


def make_models(replicas: list[int], model: str = "tiny"):
    import torch

    torch_dp = _import_torch_dp()
    torch.manual_seed(0)
    if model == "deep":
        nn = torch.nn
        module = nn.Sequential(
            *[nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU()) for _ in range(53)]
        ).eval()
        x = torch.randn(30, 4, 2, 2)
    else:
        module = torch.nn.Linear(5, 2)
        x = torch.randn(30, 5)
    # name -> a callable of the batch. "ideal xk": the k chunks that DataParallel makes, run one after another
    # through the plain module (the same compute, none of the machinery).

    class Wrapper(torch.nn.Module):
        """An nn.Module whose forward only calls the module: the floor of any wrapper written in Python (its own
        nn.Module.__call__ and forward frame)."""

        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.module = inner

        def forward(self, *inputs: Any, **kwargs: Any) -> Any:
            return self.module(*inputs, **kwargs)

    variants: dict[str, Any] = {"plain": module, "python wrapper": Wrapper(module)}
    for k in replicas:
        if k > 1:
            variants[f"ideal x{k}"] = lambda batch, k=k: [module(c) for c in batch.chunk(k)]
        variants[f"torch_dp cpu x{k}"] = torch_dp.DataParallel(module, ["cpu"] * k)
    return variants, x


def make_steps(replicas: list[int]):
    """The steps of DataParallel(Linear(5, 2), ["cpu"] * k).forward, each a callable of the batch, run on their
    own against the same engine and replicas the forward uses (torch_dp's internals: adjust with them)."""
    import torch

    torch_dp = _import_torch_dp()
    from torch_dp import _C
    from torch_dp.data_parallel import _own_steps, _record_function
    from torch_dp.engine import _split_tensors
    from torch_dp.scatter_gather import _gather

    torch.manual_seed(0)
    module = torch.nn.Linear(5, 2)
    x = torch.randn(30, 5)
    steps: dict[str, Any] = {"plain": module}
    for k in replicas:
        dp = torch_dp.DataParallel(module, ["cpu"] * k)
        with torch.no_grad():
            dp(x)
        engine, devices = dp._get_engine(), dp._devices
        replicas_, replica_devices = engine.replicas, dp._replica_devices
        with torch.no_grad():
            split = _split_tensors((x,), devices, dp.dim)[0]
            outputs = [module(*args) for args in split]
            modules = replicas_.get(k, differentiable=False)

        def profiler_event(batch: Any) -> None:
            with _record_function("DataParallel.forward"):
                pass

        def lock(batch: Any, replicas_: Any = replicas_) -> None:
            with replicas_.lock:
                pass

        steps.update(
            {
                f"x{k} forward": dp,
                f"x{k} profiler event": profiler_event,
                f"x{k} own-steps check": lambda batch, dp=dp: _own_steps(dp),
                f"x{k} lock": lock,
                f"x{k} module tree sync": lambda batch, r=replicas_, d=replica_devices: r.sync(module, d),
                f"x{k} device check": lambda batch, r=replicas_, d=replica_devices: r.check_device(d[0]),
                f"x{k} split": lambda batch, d=devices, dim=dp.dim: _split_tensors((batch,), d, dim),
                f"x{k} of which _C.scatter": lambda batch, d=devices, dim=dp.dim: _C.scatter(batch, d, None, dim),
            }
        )
        if k > 1:
            kwargs = ({},) * k
            steps.update(
                {
                    f"x{k} replicas": lambda batch, r=replicas_, k=k: r.get(k, differentiable=False),
                    f"x{k} run": lambda batch, e=engine, m=modules, s=split, d=replica_devices, kw=kwargs, dp=dp: e.run(
                        m, s, kw, d, dp.issuing, False
                    ),
                    f"x{k} gather": lambda batch, o=outputs, d=devices[0], dim=dp.dim: _gather(o, d, dim),
                    f"x{k} of which _C.gather": lambda batch, o=outputs, d=devices[0], dim=dp.dim: _C.gather(o, d, dim),
                }
            )
    return steps, x


# ---- inside valgrind ---------------------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    variants, x = make_steps(args.replicas) if args.model == "steps" else make_models(args.replicas, args.model)
    if args.helper:
        lib = ctypes.CDLL(args.helper)
        start, zero, dump = lib.cg_start, lib.cg_zero, lib.cg_dump
    else:  # every instruction is instrumented (--collect-atstart=no); only collection is switched
        start = lambda: None  # noqa: E731
        zero = torch._C._valgrind_toggle
        dump = torch._C._valgrind_toggle_and_dump_stats
    plan = []
    with torch.no_grad():
        for model in variants.values():
            for _ in range(20):
                model(x)
        start()
        for name, model in variants.items():
            for _ in range(5):  # the first instrumented calls translate code; keep them out of the counts
                model(x)
            for n in (args.n, 2 * args.n):
                zero()
                for _ in range(n):
                    model(x)
                dump()
                plan.append((name, n))
    with open(args.plan, "w") as f:
        json.dump(plan, f)


# ---- the driver --------------------------------------------------------------------------------------------


def read_totals(out_file: str) -> list[int]:
    """Ir totals of the dumps out_file.1, out_file.2, ... in order."""
    dumps = []
    for path in glob.glob(out_file + ".*"):
        suffix = path[len(out_file) + 1 :]
        if suffix.isdigit():
            dumps.append((int(suffix), path))
    totals = []
    for _, path in sorted(dumps):
        with open(path) as f:
            text = f.read()
        match = re.search(r"^(?:summary|totals):\s*(\d+)", text, re.M)
        totals.append(int(match.group(1)) if match else 0)
    return totals


def count_instructions(
    n: int, replicas: list[int], verbose: bool = False, keep: str | None = None, model: str = "tiny"
) -> dict[str, Any]:
    """Runs the worker under callgrind; per variant, instructions per forward."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise FileNotFoundError("valgrind is not installed")
    with tempfile.TemporaryDirectory(prefix="torch_dp_cg_") as tmp:
        helper = build_helper(tmp)
        out_file = os.path.join(tmp, "callgrind.out")
        plan_file = os.path.join(tmp, "plan.json")
        command = [valgrind, "--tool=callgrind", f"--callgrind-out-file={out_file}"]
        command += ["--instr-atstart=no"] if helper else ["--collect-atstart=no"]
        # sys.executable: the interpreter itself, not a wrapper script valgrind would not follow.
        command += [
            sys.executable,
            os.path.abspath(__file__),
            "--worker",
            "--n",
            str(n),
            "--replicas",
            ",".join(map(str, replicas)),
            "--plan",
            plan_file,
            "--model",
            model,
        ]
        if helper:
            command += ["--helper", helper]
        # The worker imports the torch_dp that this process imports (PYTHONPATH, installed, or the source tree).
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(_import_torch_dp().__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([package_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        t0 = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        elapsed = time.perf_counter() - t0
        if result.returncode != 0 or not os.path.exists(plan_file):
            raise RuntimeError(
                f"callgrind run failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        if verbose:
            print(result.stderr[-2000:], file=sys.stderr)
        with open(plan_file) as f:
            plan = json.load(f)
        totals = read_totals(out_file)
        if keep:  # the dumps, for callgrind_annotate: out.<k> is the k-th (variant, n) of plan.json
            os.makedirs(keep, exist_ok=True)
            for path in glob.glob(out_file + "*") + [plan_file]:
                shutil.copy(path, keep)
    if len(totals) != len(plan):
        raise RuntimeError(f"expected {len(plan)} callgrind dumps, found {len(totals)}")
    per_variant: dict[str, dict[int, int]] = {}
    for (name, count), total in zip(plan, totals):
        per_variant.setdefault(name, {})[count] = total
    result_counts = {name: (c[2 * n] - c[n]) / n for name, c in per_variant.items()}
    return {
        "per_forward": result_counts,
        "raw": per_variant,
        "n": n,
        "seconds": elapsed,
        "mode": "client requests (instrumentation only around the loops)"
        if helper
        else "torch toggles (everything instrumented)",
    }


def wall_ratio(replicas: list[int], model: str = "tiny", rounds: int = 31, block_s: float = 0.01) -> dict[str, Any]:
    """Plain and torch_dp forwards interleaved in blocks, in this process: medians and their ratio."""
    import torch

    torch.set_num_threads(1)
    variants, x = make_models(replicas, model)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    ratios: dict[str, list[float]] = {name: [] for name in variants if name != "plain"}
    with torch.no_grad():
        calls = {}
        for name, model in variants.items():
            for _ in range(50):
                model(x)
            t0 = time.perf_counter()
            for _ in range(20):
                model(x)
            one = (time.perf_counter() - t0) / 20
            calls[name] = max(1, int(block_s / max(one, 1e-7)))
        for r in range(rounds):
            this_round = {}
            names = list(variants)
            for name in names[r % len(names) :] + names[: r % len(names)]:
                model, k = variants[name], calls[name]
                t0 = time.perf_counter()
                for _ in range(k):
                    model(x)
                this_round[name] = (time.perf_counter() - t0) / k * 1e6
                samples[name].append(this_round[name])
            for name in ratios:
                ratios[name].append(this_round[name] / this_round["plain"])
    return {
        "us_per_forward": {name: statistics.median(s) for name, s in samples.items()},
        # The median of per-round ratios: each ratio compares blocks run a few milliseconds apart.
        "ratio_to_plain": {name: statistics.median(r) for name, r in ratios.items()},
        # The fastest block: what is left when the machine's other load happened not to get in the way.
        "min_us_per_forward": {name: min(s) for name, s in samples.items()},
        "rounds": rounds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="forwards per measurement (n and 2n are run)")
    parser.add_argument("--replicas", default="2", help="comma-separated replica counts, e.g. 1,2,4")
    parser.add_argument(
        "--model",
        choices=sorted(MODELS),
        default="tiny",
        help="tiny: Linear(5, 2) (default); "
        "deep: a ResNet-50-sized module tree with tiny tensors (per-module overheads); "
        "steps: the steps of the tiny forward, each on its own (no wall clock)",
    )
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--no-wall", action="store_true", help="skip the wall-clock ratio")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--keep", metavar="DIR", help="copy callgrind's dumps there (for callgrind_annotate)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    parser.add_argument("--helper", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.replicas = [int(k) for k in str(args.replicas).split(",") if k.strip()]
    if args.worker:
        worker(args)
        return 0
    if shutil.which("valgrind") is None:
        print("overhead_callgrind: valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2

    import torch

    torch_dp = _import_torch_dp()
    counts = count_instructions(args.n, args.replicas, args.verbose, args.keep, args.model)
    per = counts["per_forward"]
    plain = per["plain"]
    print(f"torch_dp from {os.path.dirname(torch_dp.__file__)}")
    print(
        f"callgrind instructions per forward: {MODELS[args.model]}, no_grad, 1 intra-op thread, "
        f"n={args.n} and {2 * args.n} forwards per variant, all threads ({counts['mode']}; "
        f"{counts['seconds']:.0f} s under valgrind)"
    )
    overheads: dict[str, dict[str, float]] = {}
    for name, value in per.items():
        extra = ""
        if name == "python wrapper":
            extra = f"   over plain {value - plain:>+12,.0f} ({value / plain:.2f} x)"
        if name.startswith("torch_dp"):
            k = name.rsplit("x", 1)[1]
            ideal = per.get(f"ideal x{k}", plain)
            overheads[name] = {"over_plain": value - plain, "over_ideal": value - ideal}
            extra = (
                f"   over plain {value - plain:>+12,.0f} ({value / plain:.2f} x)"
                f"   over ideal {value - ideal:>+12,.0f} ({value / ideal:.2f} x)"
            )
        print(f"  {name:<20} {value:>12,.0f}{extra}")
    report: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "torch": torch.__version__,
        "torch_dp": getattr(torch_dp, "__version__", None),
        "torch_dp_path": os.path.dirname(torch_dp.__file__),
        "model": MODELS[args.model],
        "callgrind": counts,
        "overhead_instructions": overheads,
    }
    if not args.no_wall and args.model != "steps":
        wall = wall_ratio(args.replicas, args.model)
        report["wall"] = wall
        print(
            f"wall clock, one run, interleaved blocks (medians of {wall['rounds']} rounds, 1 intra-op thread; "
            "min = fastest block):"
        )
        fastest_plain = wall["min_us_per_forward"]["plain"]
        for name, us in wall["us_per_forward"].items():
            fastest = wall["min_us_per_forward"][name]
            extra = (
                ""
                if name == "plain"
                else (f"   ratio {wall['ratio_to_plain'][name]:.1f} x plain   (min {fastest / fastest_plain:.1f} x)")
            )
            print(f"  {name:<20} {us:>10.1f} us   min {fastest:>8.1f} us{extra}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

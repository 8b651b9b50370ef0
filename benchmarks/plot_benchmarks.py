"""Draws the charts of the docs from the JSON that benchmarks/bench_dp.py writes, so that no picture is edited by hand.

    python benchmarks/bench_dp.py --device cpu --json benchmarks/results/bench_dp_cpu.json
    python benchmarks/plot_benchmarks.py benchmarks/results/bench_dp_cpu.json --out docs/img/bench_cpu.svg

One panel per mode (inference, training), one group of bars per model and replica list, each bar a ratio of
medians (or, with --statistic min, of the fastest rounds) from the JSON: torch_dp against the unwrapped module
on the whole batch ("plain"), against the same chunks run one after another through it ("ideal"), and, where
the JSON has it (CUDA runs), how many times faster torch_dp is than torch.nn.DataParallel. Ratios, not times,
so that a chart from a CPU run says what it can; whiskers show how much the rounds varied. The title names the
machine, torch, the date and the commit that the JSON records. Needs matplotlib (pip install matplotlib);
nothing else in the repository does.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

# (numerator, denominator: variants of a row; legend label; colour)
SERIES = [
    ("torch_dp", "plain", "torch_dp / plain module (time, lower is better)", "#4C72B0"),
    ("torch_dp", "ideal", "torch_dp / ideal: the same chunks back to back (time, lower is better)", "#DD8452"),
    ("nn.DP", "torch_dp", "torch.nn.DataParallel / torch_dp (speed-up, higher is better)", "#55A868"),
]
# bench_dp.py's JSON keeps, per variant, the median over rounds ("ms") and the fastest round ("min_ms").
STATISTICS = {"median": "ms", "min": "min_ms"}


def _ratio(row: dict[str, Any], numerator: str, denominator: str, statistic: str) -> float | None:
    a, b = (row["variants"].get(k, {}).get(STATISTICS[statistic]) for k in (numerator, denominator))
    return a / b if a and b else None


def _spread(row: dict[str, Any], numerator: str, denominator: str) -> tuple[float, float] | None:
    """The ratio's range over the middle half of the rounds: numerator's quartiles over denominator's."""
    a, b = (row["variants"].get(k, {}) for k in (numerator, denominator))
    if not all(v.get(q) for v in (a, b) for q in ("p25_ms", "p75_ms")):
        return None
    return a["p25_ms"] / b["p75_ms"], a["p75_ms"] / b["p25_ms"]


def _rows(data: dict[str, Any], mode: str) -> list[dict[str, Any]]:
    """The rows of one mode that timed torch_dp (not torch.nn.DataParallel's passthrough, not failures)."""
    return [
        r
        for r in data["rows"]
        if r.get("mode") == mode and "error" not in r and r.get("variants", {}).get("torch_dp", {}).get("ms")
    ]


def _title(meta: dict[str, Any], statistic: str) -> str:
    machine = meta.get("gpu") or f"CPU, {meta.get('cpu_count')} cores, {meta.get('torch_threads')} torch threads"
    commit = meta.get("commit") or "unknown commit"
    if meta.get("dirty"):
        commit += " (uncommitted changes)"
    return (
        f"bench_dp.py on {machine}: torch {meta.get('torch')}, {meta.get('date_utc', '')[:10]}, commit {commit}\n"
        + ("medians" if statistic == "median" else "fastest rounds")
        + " of interleaved runs; ratios of times per forward (inference) or per step (training);\n"
        "whiskers: from the numerator's first quartile over the denominator's third to its third over the first"
    )


def plot(data: dict[str, Any], out: str, statistic: str = "median") -> None:
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.hashsalt"] = "torch_dp"  # the same JSON gives the same file
    import matplotlib.pyplot as plt

    modes = [m for m in ("inference", "training") if _rows(data, m)]
    if not modes:
        raise SystemExit("plot_benchmarks: the JSON has no row that timed torch_dp")
    series = [s for s in SERIES if any(_ratio(r, s[0], s[1], statistic) for m in modes for r in _rows(data, m))]
    figure, axes = plt.subplots(1, len(modes), figsize=(7.5 * len(modes), 4.8), squeeze=False)
    width = 0.8 / len(series)
    for ax, mode in zip(axes[0], modes):
        rows = _rows(data, mode)
        labels = [f"{r['model'].replace(' b', chr(10) + 'batch ')}\n{r['replicas']}" for r in rows]
        for i, (numerator, denominator, label, colour) in enumerate(series):
            values = [_ratio(r, numerator, denominator, statistic) or 0.0 for r in rows]
            positions = [j + (i - (len(series) - 1) / 2) * width for j in range(len(rows))]
            spreads = [_spread(r, numerator, denominator) if v else None for r, v in zip(rows, values)]
            errors = [
                [max(v - s[0], 0.0) if s else 0.0 for v, s in zip(values, spreads)],
                [max(s[1] - v, 0.0) if s else 0.0 for v, s in zip(values, spreads)],
            ]
            bars = ax.bar(positions, values, width, label=label, color=colour)
            ax.errorbar(positions, values, yerr=errors, fmt="none", ecolor="#333333", elinewidth=0.8, capsize=2)
            ax.bar_label(bars, labels=[f"{v:.2f}" if v else "" for v in values], fontsize=7, padding=1)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(rows)), labels, fontsize=8)
        ax.set_title(mode)
        ax.set_ylabel("ratio")
        ax.margins(y=0.15)
    handles, legend_labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, legend_labels, loc="lower center", ncol=1, fontsize=8, frameon=False)
    figure.suptitle(_title(data["meta"], statistic), fontsize=9)
    figure.tight_layout(rect=(0, 0.06 + 0.035 * len(series), 1, 1))
    figure.savefig(out, metadata={"Date": None} if out.endswith(".svg") else None)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", help="a file written by benchmarks/bench_dp.py --json")
    parser.add_argument("--out", required=True, help="the image to write (.svg or .png)")
    parser.add_argument(
        "--statistic",
        choices=list(STATISTICS),
        default="median",
        help="each variant's median over rounds (default), or its fastest round, which other work on a shared "
        "machine disturbs less",
    )
    args = parser.parse_args(argv)
    with open(args.json) as f:
        plot(json.load(f), args.out, args.statistic)
    print(f"plot_benchmarks: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

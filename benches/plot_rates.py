#!/usr/bin/env python3
"""Draws the rate sweep of a rates JSON document (``conftest.py`` writes it) as a PNG.

    python benches/plot_rates.py [--json .benchmarks/rates.json] [--out docs/rates.png]

Left: the consumer's CPU % of a core against the produced rate, both axes logarithmic, one
line per implementation; each implementation's drain (a backlog consumed as fast as it
goes) is a star at its own throughput. Right: fastconsume's CPU over the loop's at each rate
and in drain, against 1x (the CI gate) and the issue's targets. ``pytest benches
--rates-png PATH`` draws the same at the end of a full run.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

COLOURS = {"fastconsume": "#d95f02", "confluent": "#1b9e77"}
LABELS = {"fastconsume": "fastconsume", "confluent": "confluent-kafka consume(1000) loop"}
SWEEP_TARGET = 0.8
DRAIN_TARGET = 0.5


def plot(doc: Mapping[str, Any], out: Path) -> Path:
    """Writes the figure of ``doc`` to ``out`` and returns ``out``."""
    settings = doc.get("settings", {})
    sweep: Sequence[Mapping[str, Any]] = doc.get("sweep", [])
    drain: Sequence[Mapping[str, Any]] = doc.get("drain", [])
    fig, (cpu_ax, ratio_ax) = plt.subplots(1, 2, figsize=(11, 4.6), gridspec_kw={"width_ratios": [3, 2]})
    impls = [impl for impl in COLOURS if any(row["impl"] == impl for row in [*sweep, *drain])]
    for impl in impls:
        rows = sorted((row for row in sweep if row["impl"] == impl), key=lambda row: row["rate"])
        colour = COLOURS[impl]
        above = impl == "fastconsume"  # its labels above its points, the loop's below: they may be close
        if rows:
            xs, ys = [row["produced_rate"] for row in rows], [row["cpu_percent"] for row in rows]
            cpu_ax.plot(xs, ys, "o-", color=colour, label=LABELS[impl])
            for x, y in zip(xs, ys, strict=True):
                cpu_ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 7 if above else -13),
                                ha="center", fontsize=8, color=colour)  # fmt: skip
        for row in drain:
            if row["impl"] == impl:
                x, y = row["msg_per_s"], row["cpu_percent"]
                cpu_ax.plot([x], [y], "*", color=colour, markersize=14)
                label = f"drain ({row['partitions']} partitions): {row['cpu_us_per_msg']:.2f} µs/msg"
                cpu_ax.annotate(label, (x, y), textcoords="offset points", xytext=(-10, 6 if above else -12),
                                ha="right", fontsize=8, color=colour)  # fmt: skip
    _log_axes(cpu_ax)
    cpu_ax.set_xlabel("messages per second (produced; drain: consumed)")
    cpu_ax.set_ylabel("consumer CPU, % of one core")
    cpu_ax.set_title(
        f"{settings.get('plugins', '?')} trivial plugins, {settings.get('value_bytes', '?')} B values, "
        f"{settings.get('partitions', '?')} partitions",
        fontsize=10,
    )
    cpu_ax.grid(True, which="both", alpha=0.3)
    cpu_ax.legend(loc="upper left", fontsize=8)

    _ratios(ratio_ax, sweep, drain)
    fig.suptitle(f"fastconsume against the hand-written loop ({doc.get('created', '')[:10]}, {doc.get('mode', '')})")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _log_axes(ax: Any) -> None:
    """Log scales with plain tick labels (1k, 10k; 1, 2, 5, 10 %) instead of powers of ten."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    ax.set_ylim(low / 1.3, high * 1.3)
    ax.yaxis.set_major_locator(FixedLocator([m * 10.0**e for e in range(-2, 4) for m in (1, 2, 5)]))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    left, right = ax.get_xlim()
    ax.set_xlim(left / 1.5, right * 1.5)
    ax.xaxis.set_major_locator(FixedLocator([10.0**e for e in range(2, 8)]))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: _count(v)))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _count(n: float) -> str:
    """``1500`` as ``1.5k``, ``2e6`` as ``2M``.

    >>> _count(1000), _count(14_666), _count(2e6), _count(500)
    ('1k', '14.7k', '2M', '500')
    """
    for size, unit in ((1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


def _ratios(ax: Any, sweep: Sequence[Mapping[str, Any]], drain: Sequence[Mapping[str, Any]]) -> None:
    """fastconsume's CPU over the loop's, per rate and in drain."""
    labels: list[str] = []
    ratios: list[float] = []
    for rate in sorted({row["rate"] for row in sweep}):
        fc = next((r for r in sweep if r["rate"] == rate and r["impl"] == "fastconsume"), None)
        loop = next((r for r in sweep if r["rate"] == rate and r["impl"] == "confluent"), None)
        if fc and loop and loop["cpu_percent"]:
            labels.append(_count(rate))
            ratios.append(fc["cpu_percent"] / loop["cpu_percent"])
    fc_drain = next((r for r in drain if r["impl"] == "fastconsume"), None)
    loop_drain = next((r for r in drain if r["impl"] == "confluent"), None)
    if fc_drain and loop_drain and loop_drain["cpu_us_per_msg"]:
        labels.append("drain\n(µs/msg)")
        ratios.append(fc_drain["cpu_us_per_msg"] / loop_drain["cpu_us_per_msg"])
    positions = range(len(ratios))
    bars = ax.bar(positions, ratios, color=[COLOURS["fastconsume"]] * len(ratios))
    for bar, ratio in zip(bars, ratios, strict=True):
        ax.annotate(f"{ratio:.2f}x", (bar.get_x() + bar.get_width() / 2, ratio), textcoords="offset points",
                    xytext=(0, 3), ha="center", fontsize=8)  # fmt: skip
    ax.axhline(1.0, color="black", linewidth=1, label="1x: the CI gate")
    ax.axhline(SWEEP_TARGET, color="grey", linestyle="--", linewidth=1, label=f"{SWEEP_TARGET}x: target at a rate")
    ax.axhline(DRAIN_TARGET, color="grey", linestyle=":", linewidth=1, label=f"{DRAIN_TARGET}x: target in drain")
    ax.set_xticks(list(positions), labels)
    ax.set_ylabel("fastconsume CPU / loop CPU")
    ax.set_xlabel("messages per second")
    ax.set_ylim(0, max([1.2, *ratios]) * 1.15)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("CPU ratio (lower is better)", fontsize=10)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--json", type=Path, default=Path(".benchmarks") / "rates.json", help="the rates document")
    parser.add_argument("--out", type=Path, default=Path("docs") / "rates.png", help="the PNG to write")
    args = parser.parse_args(argv)
    doc = json.loads(args.json.read_text())
    if not doc.get("sweep"):
        parser.error(f"{args.json} holds no sweep (a full run writes one: pytest benches)")
    print(plot(doc, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The rate benchmarks' results as one JSON document, and the closing tables drawn from it.

The document (written by ``conftest.py`` at the end of a session, read by ``plot_rates.py``)
holds, per series, one row per (plan, implementation) with the medians over its rounds and
each round's own numbers:

- ``sweep``: CPU % of a core against the produced rate (the seed load is its 14,666 msg/s row);
- ``drain``: the drain benchmark's medians (``drain.py``), with its CPU % of a core;
- ``scale``: partitions and plugins at the seed rate;
- ``idle``: a consumer of an empty topic.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rate import RatePlan, RateResult

SeriesResults = Mapping[RatePlan, Mapping[str, Sequence[RateResult]]]


def rate_row(plan: RatePlan, impl: str, rounds: Sequence[RateResult]) -> dict[str, Any]:
    """Medians over ``rounds``; thread shares pooled over them (each name's CPU in every
    window over the process's).

    Raises ``ValueError`` without rounds.
    """
    if not rounds:
        raise ValueError(f"no rounds for {impl} at {plan}")
    summaries = [r.summary() for r in rounds]
    pooled: dict[str, float] = {}
    for r in rounds:
        for name, cpu in r.window.thread_cpu_seconds.items():
            pooled[name] = pooled.get(name, 0.0) + cpu
    total = sum(pooled.values()) or 1.0

    def mid(key: str) -> float:
        return round(float(statistics.median(s[key] for s in summaries)), 4)

    return {
        "impl": impl,
        "rate": plan.rate,
        "partitions": plan.partitions,
        "plugins": plan.plugins,
        "rounds": len(rounds),
        **{
            key: mid(key)
            for key in (
                "cpu_percent",
                "cpu_us_per_msg",
                "produced_rate",
                "ctx_switches_per_s",
                "latency_p50_ms",
                "latency_p99_ms",
                "window_seconds",
                "load_average",
            )
        },
        "thread_shares": {
            name: round(cpu / total, 4) for name, cpu in sorted(pooled.items(), key=lambda item: -item[1]) if cpu > 0
        },
        "round_values": summaries,
    }


def series_rows(results: SeriesResults) -> list[dict[str, Any]]:
    return [rate_row(plan, impl, rounds) for plan, by_impl in results.items() for impl, rounds in by_impl.items()]


def find(rows: Iterable[Mapping[str, Any]], **match: object) -> Mapping[str, Any] | None:
    """The first row whose fields equal ``match``.

    >>> find([{"impl": "a", "rate": 1}, {"impl": "b", "rate": 1}], impl="b")
    {'impl': 'b', 'rate': 1}
    """
    return next((row for row in rows if all(row.get(k) == v for k, v in match.items())), None)


def _ratio(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None, key: str) -> str:
    if a is None or b is None or not b[key]:
        return "-"
    return f"{a[key] / b[key]:.2f}x"


def _ms(row: Mapping[str, Any] | None) -> str:
    return "-" if row is None else f"{row['latency_p50_ms']:.0f}/{row['latency_p99_ms']:.0f}"


def _shares(row: Mapping[str, Any], top: int = 5) -> str:
    return ", ".join(f"{name} {share:.0%}" for name, share in list(row["thread_shares"].items())[:top])


def summary_lines(doc: Mapping[str, Any]) -> list[tuple[str, list[str]]]:
    """The closing tables: (title, lines) for each series the document holds."""
    tables: list[tuple[str, list[str]]] = []
    sweep = doc.get("sweep", [])
    settings = doc.get("settings", {})
    if sweep:
        lines = [
            f"{'msg/s':>8}{'fc %core':>10}{'conf %core':>12}{'ratio':>8}{'fc p50/p99 ms':>15}"
            f"{'conf p50/p99':>14}{'fc ctx/s':>10}{'conf ctx/s':>12}"
        ]
        for rate in sorted({row["rate"] for row in sweep}):
            fc_row, conf = find(sweep, rate=rate, impl="fastconsume"), find(sweep, rate=rate, impl="confluent")
            lines.append(
                f"{rate:>8,}{_pct(fc_row):>10}{_pct(conf):>12}{_ratio(fc_row, conf, 'cpu_percent'):>8}"
                f"{_ms(fc_row):>15}{_ms(conf):>14}{_num(fc_row, 'ctx_switches_per_s'):>10}"
                f"{_num(conf, 'ctx_switches_per_s'):>12}"
            )
        for row in sweep:
            if row["rate"] == settings.get("seed_rate"):
                lines.append(f"  threads at {row['rate']:,} msg/s, {row['impl']}: {_shares(row)}")
        tables.append(
            (
                f"rate: {settings.get('value_bytes')} B values, {settings.get('partitions')} partitions, "
                f"{settings.get('plugins')} plugins, window {settings.get('window_seconds')} s, "
                f"medians of {settings.get('rounds')} round(s)",
                lines,
            )
        )
    scale = doc.get("scale", [])
    if scale:
        base = min(scale, key=lambda row: (row["plugins"] != settings.get("plugins"), row["partitions"]))
        lines = [f"{'partitions':>11}{'plugins':>9}{'%core':>8}{'cpu us/msg':>12}{'vs ' + _where(base):>18}"]
        for row in sorted(scale, key=lambda row: (row["plugins"], row["partitions"])):
            lines.append(
                f"{row['partitions']:>11}{row['plugins']:>9}{_pct(row):>8}{row['cpu_us_per_msg']:>12.2f}"
                f"{_ratio(row, base, 'cpu_percent'):>18}"
            )
        tables.append((f"scale: fastconsume at {settings.get('seed_rate', 0):,} msg/s", lines))
    idle = doc.get("idle", [])
    if idle:
        lines = [
            f"{row['impl']:<12} {row['cpu_percent']:.3f}% of a core, {row['ctx_switches_per_s']:.0f} ctx switches/s "
            f"over {row['window_seconds']:.0f} s"
            for row in idle
        ]
        tables.append(("idle: a consumer of an empty topic", lines))
    return tables


def _where(row: Mapping[str, Any]) -> str:
    return f"{row['partitions']}p/{row['plugins']}pl"


def _pct(row: Mapping[str, Any] | None) -> str:
    return "-" if row is None else f"{row['cpu_percent']:.2f}"


def _num(row: Mapping[str, Any] | None, key: str) -> str:
    return "-" if row is None else f"{row[key]:,.0f}"

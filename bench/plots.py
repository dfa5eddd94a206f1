"""Plots of the documentation's performance page, from the JSON ``make bench`` writes.

Reads ``bench/results.json`` (``bench/suite.py`` writes it; it is not committed) and draws, with
matplotlib, PNGs into ``docs/img/``:

* ``drain.png``:   one relay draining 100,000 events against its limits from the same run (the
                   raw producer, PostgreSQL alone claiming and deleting, the lower of the two);
* ``latency.png``: commit-to-delivery latency at 200 events/s against Kafka alone, and at the
                   higher rates (which have no Kafka-alone baseline). The JSON holds each run's
                   p50, p99, p99.9 and maximum, not every sample, so the curves are drawn through
                   those points;
* ``writers.png``: application commits/s into the outbox table against a copy without
                   triggers (and with migration 0004's triggers), by number of clients;
* ``peers.png``:   the relay beside Debezium (the peers section): drain events/s, p99 at
                   200 and 2,000 events/s, CPU per 1,000 events, peak RSS.

A figure whose data the JSON lacks (a section not run, or failed) is not drawn: its PNG is
removed and the page says so; with ``--keep``, a figure the page shows already stays as it is
(for a JSON of some sections only: ``bench/suite.py --only peers``, say). Then the block between
the ``plots:`` markers of ``docs/performance.md`` is rewritten: each figure with its caption,
which names the run (git revision and date from the JSON's ``meta``).

    .venv/bin/python bench/plots.py [--results bench/results.json] [--out docs/img]
                                    [--page docs/performance.md | --no-page] [--keep]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, NullFormatter

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results.json"
IMAGES = ROOT / "docs" / "img"
PAGE = ROOT / "docs" / "performance.md"
START = "<!-- plots: start (written by bench/plots.py from bench/results.json; do not edit) -->"
END = "<!-- plots: end -->"

RELAY = "#1f77b4"
BASELINE = "#7f7f7f"
BEFORE = "#d62728"
LIMIT = "#2ca02c"
DEBEZIUM = "#ff7f0e"


@dataclass
class Plot:
    """One figure: its file, its alt text, and what the caption says it shows."""

    name: str
    alt: str
    shows: str
    draw: Callable[[dict[str, Any]], Figure | str]


def size_label(size: str) -> str:
    n = int(size)
    return f"{n // 1024} KiB" if n % 1024 == 0 else f"{n} B"


def sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def thousands(value: float) -> str:
    return f"{value:,.0f}"


# --- drain against its limits ---------------------------------------------------------------


def draw_drain(results: dict[str, Any]) -> Figure | str:
    drain = results.get("drain", {}).get("sizes", {})
    limits = results.get("limits", {}).get("sizes", {})
    sizes = [s for s in drain if s in limits and finite(drain[s].get("events_per_s"))]
    if not sizes:
        return "the results hold no drain section with its limits"
    bars = (
        ("raw producer, same messages", "raw_producer_events_per_s", BASELINE, limits),
        ("PostgreSQL alone: claim + DELETE", "pg_claim_delete_events_per_s", LIMIT, limits),
        ("relay drain (net of start-up)", "events_per_s", RELAY, drain),
    )
    fig, ax = plt.subplots(figsize=(8, 4.2), layout="constrained")
    width = 0.26
    for i, (label, key, colour, source) in enumerate(bars):
        xs = [n + (i - 1) * width for n in range(len(sizes))]
        values = [source[s][key] for s in sizes]
        drawn = ax.bar(xs, values, width, label=label, color=colour)
        texts = [thousands(v) for v in values]
        if source is drain:  # the relay's bar also says how close it came to the limit
            texts = [
                f"{t}\n{drain[s]['ratio_to_lower_limit']:.2f} of the\nlower limit"
                for t, s in zip(texts, sizes, strict=True)
            ]
        ax.bar_label(drawn, labels=texts, fontsize=8, padding=2)
    for n, s in enumerate(sizes):
        lower = limits[s]["lower_limit_events_per_s"]
        ax.hlines(lower, n - 1.5 * width, n + 0.5 * width, colors="black", linestyles="dashed")
    ax.plot(
        [], [], color="black", linestyle="dashed", label="lower limit: min(raw, claim + DELETE)"
    )
    events = results.get("drain", {}).get("events")
    what = f"{events:,} events" if isinstance(events, int) else "a backlog"
    ax.set_xticks(range(len(sizes)), [f"{what} of {size_label(s)}" for s in sizes])
    ax.set_ylabel("events/s")
    ax.yaxis.set_major_formatter(lambda v, _pos: thousands(v))
    ax.set_ylim(0, max(limits[s]["raw_producer_events_per_s"] for s in sizes) * 1.15)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("One relay draining a backlog, against its limits from the same runs")
    return fig


# --- latency against Kafka alone ------------------------------------------------------------

#: Where each stored percentile sits on the x axis: -log10(1 - p), so 50 -> 0.3, 99 -> 2,
#: 99.9 -> 3; the maximum one step further.
POINTS = (("p50_ms", 50.0), ("p99_ms", 99.0), ("p999_ms", 99.9), ("max_ms", None))


def nines(p: float | None) -> float:
    return 4.0 if p is None else -math.log10(1 - p / 100)


def percentiles(run: dict[str, Any]) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for key, p in POINTS:
        if finite(run.get(key)):
            xs.append(nines(p))
            ys.append(run[key])
    return xs, ys


def runs_of(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in summary.get("runs", []) if len(percentiles(r)[0]) >= 2]


def percentile_axis(ax: Axes, title: str) -> None:
    ax.set_xticks([nines(p) for _, p in POINTS], ["p50", "p99", "p99.9", "max"])
    ax.set_xlabel("percentile of the run's events")
    ax.set_ylabel("latency, ms")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(lambda v, _pos: f"{v:g}")
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="major", alpha=0.3)
    ax.set_title(title)


def draw_latency(results: dict[str, Any]) -> Figure | str:
    rates = results.get("latency", {}).get("rates", {})
    base = [r for r in rates if runs_of(rates[r]) and runs_of(rates[r].get("kafka_alone", {}))]
    faster = [r for r in rates if r not in base and runs_of(rates[r])]
    if not base:
        return "the results hold no latency run with its Kafka-alone baseline"
    panels = 2 if faster else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels + 1, 4.2), layout="constrained")
    axs: list[Axes] = list(axes) if panels > 1 else [axes]
    ax = axs[0]
    rate = base[0]
    for summary, colour, label in (
        (rates[rate]["kafka_alone"], BASELINE, "Kafka alone (producer to consumer)"),
        (rates[rate], RELAY, "through the outbox (commit to delivery)"),
    ):
        for i, run in enumerate(runs_of(summary)):
            xs, ys = percentiles(run)
            ax.plot(xs, ys, marker="o", color=colour, alpha=0.8, label=label if i == 0 else None)
    percentile_axis(ax, f"At {int(rate):,} events/s, each run")
    if faster:
        percentile_axis(axs[1], "At the higher rates (no Kafka-alone baseline)")
        colours = (RELAY, "#9467bd", "#8c564b", "#e377c2")
        for n, r in enumerate(faster):
            for i, run in enumerate(runs_of(rates[r])):
                xs, ys = percentiles(run)
                axs[1].plot(
                    xs,
                    ys,
                    marker="o",
                    color=colours[n % len(colours)],
                    alpha=0.8,
                    label=f"{int(r):,} events/s" if i == 0 else None,
                )
        axs[1].legend(fontsize=8)
    axs[0].legend(fontsize=8)
    return fig


# --- writers against a bare table -----------------------------------------------------------

TABLES = (
    ("bare", "table without triggers (baseline)", BASELINE, "o"),
    ("outbox_events", "outbox table", RELAY, "s"),
    ("with_0004_triggers", "with migration 0004's triggers (before)", BEFORE, "x"),
)


def draw_writers(results: dict[str, Any]) -> Figure | str:
    cases = [
        c
        for c in results.get("writers", {}).get("cases", {}).values()
        if c.get("synchronous_commit") == "on" and "bare" in c.get("commits_per_s", {})
    ]
    by_rows = sorted({c["rows"] for c in cases})
    if not by_rows:
        return "the results hold no writers section"
    fig, axes = plt.subplots(
        1, len(by_rows), figsize=(5 * len(by_rows) + 1, 4.2), layout="constrained", squeeze=False
    )
    for ax, rows in zip(axes[0], by_rows, strict=True):
        mine = sorted((c for c in cases if c["rows"] == rows), key=lambda c: c["clients"])
        clients = [c["clients"] for c in mine]
        for table, label, colour, marker in TABLES:
            values = [c["commits_per_s"].get(table) for c in mine]
            if all(v is None for v in values):
                continue
            ax.plot(clients, values, marker=marker, color=colour, label=label)
        for c in mine:
            tps = c["commits_per_s"]
            below = tps["outbox_events"] < tps["bare"]  # keep the number off the other line
            ax.annotate(
                f"{c['ratio']:.2f}",
                (c["clients"], tps["outbox_events"]),
                xytext=(0, -14 if below else 7),
                textcoords="offset points",
                ha="center",
                fontsize=8,
                color=RELAY,
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(clients, [str(n) for n in clients])
        ax.set_xlabel("clients (pgbench -j 2)")
        ax.set_ylabel("commits/s")
        top = max(v for c in mine for v in c["commits_per_s"].values() if v is not None)
        ax.set_ylim(0, top * 1.15)
        ax.yaxis.set_major_formatter(lambda v, _pos: thousands(v))
        ax.grid(True, alpha=0.3)
        ax.set_title(f"{rows}-row transactions, synchronous_commit=on")
        ax.legend(fontsize=8)
    return fig


# --- the relay beside Debezium ----------------------------------------------------------------


def _peer_panel(
    ax: Axes, title: str, unit: str, bars: list[tuple[str, float, float]], digits: int
) -> None:
    """Grouped bars: for each measure, the relay's and Debezium's, with their values."""
    width = 0.38
    for i, (label, colour) in enumerate((("relay", RELAY), ("Debezium", DEBEZIUM))):
        xs = [n + (i - 0.5) * width for n in range(len(bars))]
        values = [bar[1 + i] for bar in bars]
        drawn = ax.bar(xs, values, width, label=label, color=colour)
        ax.bar_label(drawn, labels=[f"{v:,.{digits}f}" for v in values], fontsize=8, padding=2)
    ax.set_xticks(range(len(bars)), [bar[0] for bar in bars], fontsize=8)
    ax.set_ylabel(unit)
    ax.set_ylim(0, max(max(bar[1], bar[2]) for bar in bars) * 1.2)
    ax.set_title(title, fontsize=10)


def draw_peers(results: dict[str, Any]) -> Figure | str:
    systems = results.get("peers", {}).get("systems", {})
    if "relay" not in systems or "debezium" not in systems:
        return "the results hold no peers section"
    relay, dbz = systems["relay"], systems["debezium"]

    def pair(*path: str) -> tuple[float, float]:
        values = []
        for system in (relay, dbz):
            for part in path:
                system = system[part]
            values.append(float(system))
        return values[0], values[1]

    rates = [r for r in ("200", "2000") if r in relay["latency"]]
    fig, axes = plt.subplots(1, 4, figsize=(14, 4.2), layout="constrained")
    events = results["peers"].get("events", 0)
    _peer_panel(
        axes[0],
        f"Drain of {events:,} events",
        "events/s",
        [("first to last arrival", *pair("drain", "events_per_s"))],
        0,
    )
    axes[0].yaxis.set_major_formatter(lambda v, _pos: thousands(v))
    p99 = [(f"{int(r):,}/s", *pair("latency", r, "p99_ms")) for r in rates]
    _peer_panel(axes[1], "Commit to delivery, p99", "ms", p99, 1)
    cpu = [
        (f"{name} at {int(r):,}/s", *pair("latency", r, key))
        for r in rates[-1:]
        for name, key in (("process", "cpu_s_per_1000"), ("PostgreSQL", "pg_cpu_s_per_1000"))
    ]
    _peer_panel(axes[2], "CPU per 1,000 events", "CPU-seconds", cpu, 3)
    _peer_panel(axes[3], "Peak RSS", "MB", [("all runs", *pair("peak_rss_mb"))], 0)
    axes[0].legend(fontsize=8, loc="upper right")
    return fig


PLOTS = (
    Plot(
        "drain",
        "Drain throughput of one relay against the raw producer and PostgreSQL alone",
        "one relay draining a backlog against the limits measured in the same runs (medians; the "
        "number over the relay's bar is its ratio to the lower limit)",
        draw_drain,
    ),
    Plot(
        "latency",
        "Commit-to-delivery latency percentiles against Kafka alone",
        "commit-to-delivery latency, each run's p50, p99, p99.9 and maximum (the JSON keeps those, "
        "not every sample, so this is a CDF read at four points), against Kafka alone at the "
        "same rate",
        draw_latency,
    ),
    Plot(
        "writers",
        "Application commits per second into the outbox table against a table without triggers",
        "application commits/s into the outbox table against a copy without triggers and one with "
        "migration 0004's triggers (medians of the rounds; the numbers are the outbox table's "
        "ratio to the copy)",
        draw_writers,
    ),
    Plot(
        "peers",
        "The relay beside Debezium: drain, p99 latency, CPU and memory",
        "the relay beside Debezium (PostgreSQL connector and Outbox Event Router in Kafka Connect "
        "standalone) on the same PostgreSQL, events and Apache Kafka 4.3.0 node (its own, whatever "
        "broker the other sections ran on): drain from the first "
        "arrival to the last, commit-to-delivery p99, CPU-seconds per 1,000 events of the process "
        "and of PostgreSQL at the higher rate, peak RSS",
        draw_peers,
    ),
)


# --- the page --------------------------------------------------------------------------------


def describe_run(meta: dict[str, Any]) -> str:
    """The caption's account of the run: revision, date and setting (HTML)."""
    started = meta.get("started")
    when = "an unknown date"
    if isinstance(started, str):
        try:
            moment = datetime.datetime.fromisoformat(started).astimezone(datetime.UTC)
            when = moment.strftime("%Y-%m-%d %H:%M UTC")
        except ValueError:
            when = started
    runs = meta.get("options", {}).get("runs")
    parts = [
        f"<code>make bench</code> at {meta.get('git', 'an unknown revision')}, {when}",
        f"medians of {runs} runs" if runs else "",
        f"{meta['cpus']} CPUs" if meta.get("cpus") else "",
        f"PostgreSQL {meta['postgresql']} ({meta.get('database', '?')})"
        if meta.get("postgresql")
        else "",
        f"Kafka: {meta['kafka']}" if meta.get("kafka") else "",
        f"sections run: {', '.join(meta['sections'])}" if meta.get("sections") else "",
    ]
    return "; ".join(p for p in parts if p)


def shown_figures(page: Path) -> dict[str, list[str]]:
    """The figures the page's block holds now, by plot name (what ``--keep`` leaves in place)."""
    text = page.read_text()
    start, end = text.find(START), text.find(END)
    figures: dict[str, list[str]] = {}
    for chunk in re.findall(r"<figure markdown>.*?</figure>", text[start:end], re.DOTALL):
        name = re.search(r"\(img/([\w-]+)\.png\)", chunk)
        if name:
            figures[name.group(1)] = [*chunk.splitlines(), ""]
    return figures


def draw_all(
    results: dict[str, Any], out: Path, keep: dict[str, list[str]] | None = None
) -> list[str]:
    """Draw every plot into ``out``; return the page's block (Markdown lines). A plot without
    data whose figure ``keep`` holds keeps that figure (and its PNG)."""
    out.mkdir(parents=True, exist_ok=True)
    run = describe_run(results.get("meta", {}))
    block = [START, ""]
    for plot in PLOTS:
        path = out / f"{plot.name}.png"
        drawn = plot.draw(results)
        if isinstance(drawn, str) and keep and plot.name in keep and path.exists():
            block += keep[plot.name]
            print(f"{plot.name}: kept as the page shows it ({drawn})")
            continue
        if isinstance(drawn, str):
            path.unlink(missing_ok=True)
            block += [f"**{sentence(plot.name)}:** not drawn: {drawn}.", ""]
            print(f"{plot.name}: skipped ({drawn})")
            continue
        drawn.savefig(path, dpi=110)
        plt.close(drawn)
        block += [
            "<figure markdown>",
            f"![{plot.alt}](img/{path.name})",
            f"<figcaption>{sentence(plot.shows)}. {run}.</figcaption>",
            "</figure>",
            "",
        ]
        print(f"{plot.name}: {path}")
    return [*block, END]


def rewrite_page(page: Path, block: list[str]) -> None:
    text = page.read_text()
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"{page}: no '{START}' ... '{END}' block to rewrite")
    page.write_text(text[:start] + "\n".join(block) + text[end + len(END) :])
    print(f"rewrote the plots block of {page}")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="the suite's JSON")
    parser.add_argument("--out", type=Path, default=IMAGES, help="directory for the PNGs")
    parser.add_argument("--page", type=Path, default=PAGE, help="page whose block to rewrite")
    parser.add_argument("--no-page", action="store_true", help="draw only; print the block")
    parser.add_argument(
        "--keep", action="store_true", help="keep the page's figures this JSON has no data for"
    )
    args = parser.parse_args()
    if not args.results.exists():
        print(f"{args.results} not found: run `make bench` first", file=sys.stderr)
        return 1
    keep = shown_figures(args.page) if args.keep else None
    block = draw_all(json.loads(args.results.read_text()), args.out, keep)
    if args.no_page:
        print("\n".join(block))
    else:
        rewrite_page(args.page, block)
    return 0


if __name__ == "__main__":
    sys.exit(main())

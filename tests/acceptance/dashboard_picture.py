"""A picture of some of the dashboard's panels, drawn with matplotlib from what a real
Prometheus recorded: the range queries of tests/acceptance/test_dashboards.py, asked with the
dashboard's own queries. Drawn only when OUTBOX_DASHBOARD_PNG names a file (make
dashboard-picture writes docs/img/dashboard.png)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

#: The panels drawn, by title, in reading order (two columns).
PANELS = (
    "Events published / s by topic",
    "Messages processed / s",
    "Backlog",
    "Delivery failures / s by reason",
    "Oldest unpublished event",
    "Circuit breaker",
)


@dataclass(frozen=True)
class Line:
    label: str
    times: list[float]  # seconds since the start of the picture
    values: list[float]


def legend(template: str, labels: dict[str, str]) -> str:
    """Grafana's legend format: ``{{name}}`` becomes the series' label ``name``."""
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)


def draw(panels: dict[str, list[Line]], marks: dict[str, float], path: Path) -> None:
    """One small chart per panel, the moments in ``marks`` as dashed vertical lines."""
    rows = (len(panels) + 1) // 2
    figure, axes = plt.subplots(rows, 2, figsize=(12, 3 * rows), sharex=True)
    for axis, (title, lines) in zip(axes.flat, panels.items(), strict=False):
        for line in lines:
            axis.plot(line.times, line.values, label=line.label, linewidth=1.5)
        for label, moment in marks.items():
            axis.axvline(moment, color="grey", linestyle="--", linewidth=1)
            axis.annotate(
                label,
                (moment, 1),
                xycoords=("data", "axes fraction"),
                xytext=(3, -12),
                textcoords="offset points",
                fontsize=8,
                color="grey",
            )
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
        if len(lines) > 1:
            axis.legend(fontsize=7, loc="upper left")
    for axis in axes[-1]:
        axis.set_xlabel("seconds")
    figure.suptitle(
        "outbox-relay dashboard panels, from a real Prometheus scraping a relay and a consumer "
        "(tests/acceptance/test_dashboards.py)",
        fontsize=10,
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)

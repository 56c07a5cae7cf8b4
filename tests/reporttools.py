"""Reading a comparison report back in tests: its markdown tables, and what each figure plots."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from fxreplay import plots


def markdown_table(report: str, heading: str) -> dict[tuple[str, int], str]:
    """The cells of the markdown table under ``## heading``, keyed by (method, K)."""
    section = report.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("|")]
    header, body = rows[0], rows[2:]
    Ks = {i: int(h[2:]) for i, h in enumerate(header) if h.startswith("K=")}
    return {(row[0].lower(), K): row[i] for row in body for i, K in Ks.items()}


def drawn(fig: Any) -> list[dict[str, Any]]:
    """The visible panels of a figure as data: title, labelled lines (x, y), bar heights,
    filled bands (their y ranges), broken-bar segments, legend entries (the axes' and the
    figure's), and the panel's free texts."""
    panels = []
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        legends = [leg for leg in (ax.get_legend(), *fig.legends) if leg is not None]
        bands = [c for c in ax.collections if type(c).__name__ in ("PolyCollection", "FillBetweenPolyCollection")]
        panels.append({
            "title": ax.get_title(),
            "lines": {line.get_label(): (list(map(float, line.get_xdata())), list(map(float, line.get_ydata())))
                      for line in ax.get_lines() if not line.get_label().startswith("_")},
            "bars": [float(p.get_height()) for p in ax.patches],
            "bands": [(float(p.vertices[:, 1].min()), float(p.vertices[:, 1].max())) for c in bands for p in c.get_paths()],
            "segments": sum(len(c.get_paths()) for c in ax.collections),
            "legend": [t.get_text() for leg in legends for t in leg.get_texts()],
            "texts": [t.get_text() for t in ax.texts],
        })
    return panels


@contextmanager
def recording_figures() -> Iterator[dict[str, list[dict[str, Any]]]]:
    """Within: every figure the report saves is also recorded, by file name, as :func:`drawn` data."""
    record: dict[str, list[dict[str, Any]]] = {}
    original = plots._save

    def save(fig: Any, path: Path) -> Path:
        record[path.name] = drawn(fig)
        return original(fig, path)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plots, "_save", save)
        yield record

"""How every benchmark reports its figures: one table on stdout, and JSON for the suite.

A benchmark builds a :class:`BenchResults`, adds each figure with :meth:`BenchResults.add`
(its value and unit, the baseline measured in the same run, their ratio, the goal and
whether the goal is met), and ends with :meth:`BenchResults.finish`: that prints the
markdown table (figure | value | baseline | ratio | goal | pass/short) and, when asked,
writes the same figures as JSON -- to the path given with ``--results PATH``
(:func:`add_results_argument`) or, failing that, in the environment variable
``EDGEFLEET_BENCH_RESULTS`` (what ``bench/suite.py`` sets, so that a script which does
not know the option yet is not broken by it).

What always holds: a figure's verdict is ``pass`` or ``short`` when it has a goal that
was checked, ``info`` when it has none; the JSON holds exactly the rows printed.

    results = BenchResults("drift", quick=args.quick, path=args.results)
    results.add("one row", 31.2, "us", baseline=410.0, ratio=31.2 / 410.0, goal="≤ 1")
    results.finish()
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

__all__ = [
    "RESULTS_ENV",
    "SCHEMA_VERSION",
    "BenchResults",
    "Figure",
    "add_results_argument",
    "markdown_cell",
]

RESULTS_ENV = "EDGEFLEET_BENCH_RESULTS"
SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class Figure:
    """One row of a benchmark's table."""

    figure: str
    value: float | int | str | None
    unit: str
    value_text: str
    baseline: float | int | str | None
    baseline_text: str
    ratio: float | None
    ratio_text: str
    goal: str
    result: str  # "pass", "short" or "info"

    def cells(self) -> list[str]:
        return [
            self.figure,
            self.value_text,
            self.baseline_text,
            self.ratio_text,
            self.goal or "—",
            self.result,
        ]


def markdown_cell(text: object) -> str:
    """``text`` safe inside a markdown table cell (no pipe, no line break)."""
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


def _number_text(value: float | int, unit: str) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        text = f"{value:,}"
    elif not math.isfinite(value):
        text = str(value)
    elif value == 0 or abs(value) >= 100:
        text = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.1f}"
    elif abs(value) >= 1:
        text = f"{value:.2f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}".strip()


def add_results_argument(parser: argparse.ArgumentParser) -> None:
    """``--results PATH``: also write the figures as JSON there."""
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        metavar="PATH",
        help=f"also write the figures as JSON to PATH (or set {RESULTS_ENV})",
    )


class BenchResults:
    """The figures of one benchmark run."""

    def __init__(self, benchmark: str, *, quick: bool, path: Path | str | None = None) -> None:
        if not benchmark:
            raise ValueError("a benchmark needs a name")
        self.benchmark = benchmark
        self.quick = quick
        env_path = os.environ.get(RESULTS_ENV) or None
        self.path = Path(path) if path is not None else (Path(env_path) if env_path else None)
        self.context: list[str] = []
        self.figures: list[Figure] = []
        self.started_at = datetime.now(UTC)

    def note(self, text: str) -> None:
        """A line of context printed above the table (sizes, machine, what was measured)."""
        self.context.append(text)

    def add(
        self,
        figure: str,
        value: float | int | str | None,
        unit: str = "",
        *,
        baseline: float | int | str | None = None,
        baseline_unit: str | None = None,
        baseline_text: str | None = None,
        value_text: str | None = None,
        ratio: float | None = None,
        ratio_text: str | None = None,
        goal: str = "",
        passed: bool | None = None,
    ) -> Figure:
        """Record one figure. ``passed`` is None when the figure has no checked goal."""
        if not figure:
            raise ValueError("a figure needs a name")
        if passed is not None and not goal:
            raise ValueError(f"{figure!r}: a pass/short verdict needs the goal it was held to")
        if ratio is not None and not math.isfinite(ratio):
            ratio = None
        if value_text is None:
            value_text = (
                _number_text(value, unit)
                if isinstance(value, int | float)
                else ("" if value is None else f"{value} {unit}".strip())
            )
        if baseline_text is None:
            b_unit = unit if baseline_unit is None else baseline_unit
            baseline_text = (
                _number_text(baseline, b_unit)
                if isinstance(baseline, int | float)
                else ("" if baseline is None else str(baseline))
            )
        if ratio_text is None:
            ratio_text = "" if ratio is None else f"{ratio:.3g}" if ratio < 10 else f"{ratio:.1f}"
        row = Figure(
            figure=figure,
            value=value,
            unit=unit,
            value_text=value_text,
            baseline=baseline,
            baseline_text=baseline_text,
            ratio=ratio,
            ratio_text=ratio_text,
            goal=goal,
            result="info" if passed is None else ("pass" if passed else "short"),
        )
        self.figures.append(row)
        return row

    def add_row(
        self,
        figure: str,
        value: str,
        baseline: str = "",
        ratio: str = "",
        goal: str = "",
        result: str = "info",
    ) -> Figure:
        """A figure given as the table's text cells (for scripts that format their own);
        ``result`` is ``pass``, ``short`` or ``info``."""
        if result not in ("pass", "short", "info"):
            raise ValueError(f"{figure!r}: result must be pass, short or info, not {result!r}")
        try:
            ratio_value: float | None = float(ratio.split()[0]) if ratio else None
        except ValueError:
            ratio_value = None
        return self.add(
            figure,
            value,
            value_text=value,
            baseline_text=baseline,
            ratio=ratio_value,
            ratio_text=ratio,
            goal="" if goal in ("", "—") else goal,
            passed=None if result == "info" else result == "pass",
        )

    def markdown(self) -> str:
        lines = [
            "| figure | value | baseline | ratio | goal | pass/short |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for figure in self.figures:
            lines.append("| " + " | ".join(markdown_cell(c) for c in figure.cells()) + " |")
        return "\n".join(lines)

    def to_json(self) -> dict[str, object]:
        return {
            "schema": SCHEMA_VERSION,
            "benchmark": self.benchmark,
            "mode": "quick" if self.quick else "full",
            "started_at": self.started_at.isoformat(),
            "finished_at": datetime.now(UTC).isoformat(),
            "host": platform.node(),
            "context": self.context,
            "figures": [asdict(f) for f in self.figures],
        }

    def write(self) -> Path | None:
        """Write the JSON (atomically) when a path was given; return it."""
        if self.path is None:
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, default=str) + "\n")
        tmp.replace(self.path)
        return self.path

    def finish(self) -> None:
        """Print the context and the table; write the JSON when asked."""
        if self.context:
            print("\n".join(self.context) + "\n")
        print(self.markdown())
        written = self.write()
        if written is not None:
            print(f"\n(figures written to {written})")

"""Run every benchmark, each as its own process, and write one table to ``bench/RESULTS.md``.

Every ``bench/*.py`` script but this one and ``results.py`` is a benchmark. Each runs in a
process of its own (full mode by default, ``--quick`` for CI), one after the other so that
they never compete for the machine, with ``EDGEFLEET_BENCH_RESULTS`` naming the JSON file
it should write its figures to (see ``bench/results.py``). Their output goes to the
terminal as it comes. The suite then writes one markdown table -- benchmark, figure,
value, baseline, ratio, goal, pass/short -- beside a description of the machine (CPU
model, cores, RAM, OS, Python, key package versions, date, load when it started).

A script that exits cleanly without writing its JSON is shown as ``no results`` (it does
not report through ``bench/results.py`` yet); one that fails or times out as ``failed``
with its exit code and the last line it printed. The suite's own exit code is non-zero
when any benchmark failed -- a figure that falls ``short`` of its goal is a result, not
a failure.

    python bench/suite.py [--quick] [--output bench/RESULTS.md] [--timeout S] [SCRIPT ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from results import RESULTS_ENV, SCHEMA_VERSION, markdown_cell

BENCH = Path(__file__).resolve().parent
NOT_BENCHMARKS = {"suite.py", "results.py", "__init__.py"}
PACKAGES = (
    "numpy",
    "tensorflow",
    "ai-edge-litert",
    "onnxruntime",
    "paho-mqtt",
    "fastapi",
    "uvicorn",
    "sqlmodel",
    "sqlalchemy",
    "psycopg",
    "pydantic",
)


@dataclass
class Outcome:
    script: str
    status: str  # "ok", "no results", "failed"
    seconds: float
    exit_code: int | None
    detail: str = ""
    data: dict[str, Any] | None = None
    tail: list[str] = field(default_factory=list)


def discover() -> list[Path]:
    return sorted(p for p in BENCH.glob("*.py") if p.name not in NOT_BENCHMARKS)


def _pump(stream: Any, tail: deque[str], echo: bool) -> None:
    for line in stream:
        tail.append(line.rstrip("\n"))
        if echo:
            sys.stdout.write(line)
            sys.stdout.flush()


def run_one(script: Path, *, quick: bool, timeout: float, work: Path, echo: bool) -> Outcome:
    """Run one benchmark script and read the figures it wrote."""
    results_path = work / f"{script.stem}.json"
    env = {**os.environ, RESULTS_ENV: str(results_path), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(script)] + (["--quick"] if quick else [])
    if echo:
        print(f"\n=== {script.name} ({'quick' if quick else 'full'}) ===", flush=True)
    started = time.monotonic()
    tail: deque[str] = deque(maxlen=40)
    process = subprocess.Popen(
        command,
        cwd=BENCH.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,  # a timeout ends the script's own children too
    )
    reader = threading.Thread(target=_pump, args=(process.stdout, tail, echo), daemon=True)
    reader.start()
    try:
        code: int | None = process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait()
        code = None
    reader.join(10)
    seconds = time.monotonic() - started
    last = next((line for line in reversed(tail) if line.strip()), "")
    if code is None:
        return Outcome(script.name, "failed", seconds, None, f"timed out after {timeout:.0f} s")
    if code != 0:
        return Outcome(script.name, "failed", seconds, code, f"exit code {code}: {last}"[:300])
    if not results_path.is_file():
        return Outcome(
            script.name, "no results", seconds, code, "ran, but wrote no figures (results.py)"
        )
    try:
        data = json.loads(results_path.read_text())
        if data.get("schema") != SCHEMA_VERSION or not isinstance(data.get("figures"), list):
            raise ValueError(f"schema {data.get('schema')!r}, expected {SCHEMA_VERSION}")
    except ValueError as e:
        return Outcome(script.name, "failed", seconds, code, f"unreadable figures: {e}")
    return Outcome(script.name, "ok", seconds, code, data=data)


# ----------------------------------------------------------------------------- the machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except (OSError, ValueError):
        pass
    return "unknown"


def _mosquitto() -> str:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        return "not installed"
    result = subprocess.run([binary, "-h"], capture_output=True, text=True, check=False)
    match = re.search(r"mosquitto version (\S+)", result.stdout + result.stderr)
    return match.group(1) if match else "unknown version"


def _git_commit() -> str:
    result = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=BENCH.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=BENCH.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    commit = result.stdout.strip() or "unknown"
    return commit + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "CPU": _cpu_model(),
        "cores": f"{cores} ({usable} usable by this process)",
        "RAM": _memory(),
        "OS": platform.platform(),
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": ", ".join(versions),
        "Mosquitto": _mosquitto(),
        "commit": _git_commit(),
        "load average at start (1/5/15 min)": " / ".join(f"{x:.2f}" for x in load),
    }


# ----------------------------------------------------------------------------- the table


def render(
    outcomes: list[Outcome], *, quick: bool, machine_facts: dict[str, str], started: datetime
) -> str:
    finished = datetime.now(UTC)
    lines = [
        "# Benchmark results",
        "",
        f"`python bench/suite.py{' --quick' if quick else ''}` ({'quick' if quick else 'full'} "
        f"mode), {started:%Y-%m-%d %H:%M} – {finished:%H:%M} UTC. Every figure is measured "
        "against a baseline taken in the same run; a goal that is not met is `short`, a figure "
        "without a goal is `info`. Written by the suite: do not edit by hand.",
        "",
        "## Machine",
        "",
    ]
    lines += [f"- **{key}**: {value}" for key, value in machine_facts.items()]
    lines += [
        "",
        "## Figures",
        "",
        "| benchmark | figure | value | baseline | ratio | goal | pass/short |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for outcome in outcomes:
        name = outcome.script.removesuffix(".py")
        if outcome.data is None:
            lines.append(
                f"| {name} | {markdown_cell(outcome.detail)} |  |  |  |  | {outcome.status} |"
            )
            continue
        for figure in outcome.data["figures"]:
            cells = [
                name,
                figure.get("figure", ""),
                figure.get("value_text", ""),
                figure.get("baseline_text", ""),
                figure.get("ratio_text", ""),
                figure.get("goal") or "—",
                figure.get("result", ""),
            ]
            lines.append("| " + " | ".join(markdown_cell(c) for c in cells) + " |")
    lines += ["", "## Runs", ""]
    for outcome in outcomes:
        context = ""
        if outcome.data is not None and outcome.data.get("context"):
            context = " — " + " ".join(str(c) for c in outcome.data["context"])
        status = outcome.status if outcome.status != "ok" else "ran"
        lines.append(
            f"- `{outcome.script}`: {status} in {outcome.seconds:.0f} s"
            + (f" ({outcome.detail})" if outcome.detail else "")
            + context
        )
    counts = {
        verdict: sum(
            1
            for o in outcomes
            if o.data is not None
            for f in o.data["figures"]
            if f.get("result") == verdict
        )
        for verdict in ("pass", "short", "info")
    }
    lines += [
        "",
        f"{len(outcomes)} benchmarks: "
        f"{sum(o.status == 'ok' for o in outcomes)} ran, "
        f"{sum(o.status == 'no results' for o in outcomes)} without results, "
        f"{sum(o.status == 'failed' for o in outcomes)} failed; figures: "
        f"{counts['pass']} pass, {counts['short']} short, {counts['info']} info.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="each benchmark's quick mode (CI)")
    parser.add_argument(
        "--output", type=Path, default=BENCH / "RESULTS.md", help="where to write the table"
    )
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds per benchmark (900 quick, 3600 full)"
    )
    parser.add_argument("--quiet", action="store_true", help="do not echo the benchmarks' output")
    parser.add_argument(
        "scripts", nargs="*", type=Path, help="benchmark scripts (default: every bench/*.py)"
    )
    args = parser.parse_args()
    scripts = [p.resolve() for p in args.scripts] or discover()
    for script in scripts:
        if not script.is_file():
            parser.error(f"{script}: no such benchmark script")
    timeout = args.timeout or (900.0 if args.quick else 3600.0)
    started = datetime.now(UTC)
    facts = machine()
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-suite-") as work:
        for script in scripts:
            outcome = run_one(
                script, quick=args.quick, timeout=timeout, work=Path(work), echo=not args.quiet
            )
            outcomes.append(outcome)
            print(
                f"--- {script.name}: {outcome.status} in {outcome.seconds:.0f} s"
                + (f" ({outcome.detail})" if outcome.detail else ""),
                flush=True,
            )
    text = render(outcomes, quick=args.quick, machine_facts=facts, started=started)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"\nwrote {args.output}")
    return 1 if any(o.status == "failed" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())

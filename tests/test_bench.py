"""Each benchmark's quick mode still runs and meets its goals (figures are not asserted:
these machines are noisy; the goals checked here are ratios, not wall-clock limits), and
the suite turns what they report into one table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def rows(out: str) -> dict[str, list[str]]:
    """The markdown table a benchmark printed: figure -> its other cells."""
    table = {}
    for line in out.splitlines():
        if line.startswith("| ") and not line.startswith(("| figure", "| ---")):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            table[cells[0]] = cells[1:]
    return table


def run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", *args],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=BENCH.parent,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def test_drift_bench_quick() -> None:
    out = run("drift.py")
    assert "counts + moments, one row of 64" in out


def test_drift_query_bench_quick_answers_exactly_and_prints_its_figures() -> None:
    """The bench checks its answer against the numpy sum itself; times are printed only."""
    out = run("drift_query.py")
    for figure in ("one day (24 windows), whole fleet", "rolling 24 h", "half the devices"):
        assert figure in out, out


@pytest.mark.slow
def test_quantize_bench_quick_meets_the_size_and_accuracy_goals() -> None:
    out = run("quantize.py")
    table = [line for line in out.splitlines() if line.startswith("| ")]
    goals = [line for line in table if "≤" in line and "whole pipeline" not in line]
    assert len(goals) == 4, out
    assert all(line.rstrip(" |").endswith("pass") for line in goals), out


@pytest.mark.slow
def test_serving_bench_quick_measures_every_figure() -> None:
    """Its goals are issue 4's open work: the bench must run and report them, pass or short."""
    out = run("serving.py")
    for figure in ("bare invoke() p50", "RSS after loading", "cold start"):
        assert figure in out, out


@pytest.mark.slow
@pytest.mark.broker
def test_rollout_bench_quick_delivers_every_byte_once() -> None:
    """A small simulated fleet takes a rollout from a real server process; the ratio of
    bytes delivered to artifact x devices must be exactly 1 (nothing fetched twice)."""
    out = run("rollout.py")
    table = rows(out)
    assert table["bytes delivered ÷ (artifact × devices)"][-1] == "pass", out
    for figure in ("rollout start → all activated", "server CPU per device"):
        assert figure in table, out


@pytest.mark.slow
@pytest.mark.broker
def test_load_bench_quick_loses_no_report_and_writes_its_figures(tmp_path: Path) -> None:
    """Simulated devices report every second into a real server with two ingest workers:
    sent must equal ingested, nothing stored that was not sent, and the run says whether the
    simulator kept its schedule; the figures also go to the JSON the suite reads."""
    out = run("load.py", "--results", str(tmp_path / "load.json"))
    table = rows(out)
    assert table["reports sent − ingested (lost)"][-1] == "pass", out
    assert table["reports dropped by ingestion (malformed, unknown device, …)"][-1] == "pass"
    assert table["reports stored that no device sent"][-1] == "pass", out
    # a simulator that fell behind its schedule can never pass for the load asked for
    pace = table["reports sent / due (the simulator's pace)"]
    assert pace[-1] == ("pass" if float(pace[2]) >= 0.99 else "short"), out
    assert ("SHORT RUN" in out) == (pace[-1] == "short"), out
    for figure in ("ingestion lag p99", "server RSS start / middle / end (server + workers)"):
        assert figure in table, out
    written = json.loads((tmp_path / "load.json").read_text())
    assert written["benchmark"] == "load" and written["mode"] == "quick"
    assert [f["figure"] for f in written["figures"]] == list(table)


def test_suite_writes_one_table_and_marks_scripts_without_results(tmp_path: Path) -> None:
    """The suite runs each script in its own process: figures of a script that reports
    them, "no results" for one that does not (yet), "failed" for one that crashes."""
    silent = tmp_path / "silent.py"
    silent.write_text("print('| figure | value |')\n")
    crashing = tmp_path / "crashing.py"
    crashing.write_text("raise SystemExit('no broker here')\n")
    output = tmp_path / "RESULTS.md"
    result = subprocess.run(
        [
            sys.executable,
            str(BENCH / "suite.py"),
            "--quick",
            "--quiet",
            "--output",
            str(output),
            str(BENCH / "drift.py"),
            str(silent),
            str(crashing),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=BENCH.parent,
    )
    assert result.returncode == 1, result.stdout + result.stderr  # one benchmark failed
    text = output.read_text()
    assert "| benchmark | figure | value | baseline | ratio | goal | pass/short |" in text
    for fact in ("**CPU**", "**cores**", "**RAM**", "**OS**", "**Python**", "numpy "):
        assert fact in text, text
    lines = text.splitlines()
    drift = [line for line in lines if line.startswith("| drift | ")]
    assert len(drift) == 3 and any("one row of 64" in line for line in drift), text
    assert any(line.startswith("| silent |") and line.endswith("| no results |") for line in lines)
    (crashed,) = [line for line in lines if line.startswith("| crashing |")]
    assert "no broker here" in crashed and crashed.endswith("| failed |"), text


@pytest.mark.slow
@pytest.mark.broker
def test_ingest_bench_quick_stores_every_report_once_and_prints_its_figures() -> None:
    """Two worker processes drain a Mosquitto backlog into SQLite; the bench itself checks
    that every report and every rollup count was stored exactly once (rates are printed)."""
    out = run("ingest.py")
    lines = {line.split(" | ")[0].lstrip("| "): line for line in out.splitlines() if "|" in line}
    assert lines["stored exactly once (reports, rollup inferences)"].rstrip(" |").endswith("pass")
    assert lines["split between the workers (messages received)"].rstrip(" |").endswith("pass")
    sustained = next(v for k, v in lines.items() if k.startswith("sustained ingestion, 2 worker"))
    assert "bare paho subscriber" in sustained, out


def test_results_print_the_table_and_write_the_same_figures_as_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_results", BENCH / "results.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_results", module)  # its dataclasses look it up
    spec.loader.exec_module(module)
    results = module.BenchResults("demo", quick=True, path=tmp_path / "out.json")
    results.add("size | ratio", 30.0, "kB", baseline=100.0, ratio=0.3, goal="≤ 0.5", passed=True)
    results.add("latency", 2.0, "ms", baseline=1.0, ratio=2.0, goal="≤ 1.5", passed=False)
    results.add_row("rate", "1,739 reports/s", "26,009 reports/s", "0.07", "—", "info")
    with pytest.raises(ValueError, match="needs the goal"):
        results.add("no goal", 1.0, passed=True)
    with pytest.raises(ValueError, match="pass, short or info"):
        results.add_row("odd", "1", result="gate failed")
    results.finish()
    table = rows(capsys.readouterr().out)
    assert table["size \\| ratio"] == ["30.00 kB", "100.0 kB", "0.3", "≤ 0.5", "pass"]
    assert table["latency"][-1] == "short" and table["rate"][-1] == "info"
    written = json.loads((tmp_path / "out.json").read_text())
    assert [f["result"] for f in written["figures"]] == ["pass", "short", "info"]
    assert written["figures"][2]["ratio"] == 0.07

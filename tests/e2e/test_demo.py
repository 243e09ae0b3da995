"""`edgefleet demo` must always run to the end: it is the first thing a new user runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_runs_the_loop_and_exits(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "edgefleet"
    result = subprocess.run(
        [str(exe), "demo", "--exit-after", "0", "--data-dir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "160", "TF_CPP_MIN_LOG_LEVEL": "2"},
        cwd=tmp_path,
    )
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    assert "done in" in out
    assert out.count("refused as it should be") == 3
    assert "rollback" in out and "wrong_device" in out
    # the drifted stream shows drift the normal one does not
    lines = {line.split()[0]: line for line in out.splitlines() if "median PSI" in line}
    normal = float(lines["normal"].split("median PSI")[1].split()[0])
    drifted = float(lines["drifted"].split("median PSI")[1].split()[0])
    assert drifted > 0.25 > 0.1 > normal
    assert (tmp_path / "demo" / "edgefleet.db").exists()
    # a second run reuses its own folder without complaint
    again = subprocess.run(
        [str(exe), "demo", "--exit-after", "0", "--data-dir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert again.returncode == 0


def test_demo_refuses_a_folder_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("do not delete")
    exe = Path(sys.executable).parent / "edgefleet"
    result = subprocess.run(
        [str(exe), "demo", "--exit-after", "0", "--data-dir", str(tmp_path / "precious")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "was not made by the demo" in result.stdout + result.stderr
    assert (tmp_path / "precious" / "thesis.tex").exists()

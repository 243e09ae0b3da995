"""`edgefleet demo` must always run to the end: it is the first thing a new user runs.

The demo runs as a user runs it (the console script, in a subprocess) and is checked
through what it prints and the summary it writes, whose figures it read back from the
server's API: both canary rollouts completed, forged documents are refused, the drift API
sees ``line-b``'s glare pixels drift and nothing on ``line-a``, the drift alert opens
for ``line-b`` only, the labelled glare frames become a dataset version, the retraining
policy fires for ``line-b`` with that evidence, trains the candidate on that version and
canaries it to ``line-b`` only, and every agent process is stopped cleanly -- also when
the demo is interrupted half-way.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from server.demo import AGENTS_PER_GROUP, GROUPS, MODEL_NAME, SUMMARY_FILE

EXE = Path(sys.executable).parent / "edgefleet"
ENV = {**os.environ, "COLUMNS": "160", "TF_CPP_MIN_LOG_LEVEL": "2"}


def summary_of(data_dir: Path) -> dict[str, Any]:
    summary: dict[str, Any] = json.loads((data_dir / SUMMARY_FILE).read_text())
    return summary


def assert_stopped_cleanly(agents: dict[str, Any]) -> None:
    assert len(agents) == len(GROUPS) * AGENTS_PER_GROUP
    for device_id, agent in agents.items():
        assert agent["exit_code"] == 0, f"{device_id}: {Path(agent['log']).read_text()[-2000:]}"
        with pytest.raises(ProcessLookupError):
            os.kill(agent["pid"], 0)


@pytest.mark.slow
def test_demo_runs_the_loop_with_real_agents_and_exits(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo"
    data_dir.mkdir()  # as an earlier run left it: reused without complaint
    (data_dir / ".edgefleet-demo").write_text("made by `edgefleet demo`\n")
    (data_dir / "left-by-the-last-run").write_text("stale")
    result = subprocess.run(
        [str(EXE), "demo", "--exit-after", "0", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard, not a speed limit
        env=ENV,
        cwd=tmp_path,
    )
    out = result.stdout
    assert result.returncode == 0, out[-4000:] + result.stderr[-4000:]
    assert "done in" in out
    # The dashboard link (with the dev admin token) and the drift view come whole, to copy.
    assert re.search(r"dashboard http://127\.0\.0\.1:\d+/#token=ef_op_[\w-]+\n", out), out[-3000:]
    assert re.search(r"http://\S+/drift\?model=digits-cnn&version=1&group=line-b&since=1h\n", out)
    assert not (data_dir / "left-by-the-last-run").exists()
    summary = summary_of(data_dir)
    assert summary["completed"] is True
    version = summary["version"]
    agents = summary["agents"]
    members = {g: {d for d, a in agents.items() if a["group"] == g} for g in GROUPS}
    assert all(len(m) == AGENTS_PER_GROUP for m in members.values())

    # A canary rollout per group, completed, every member activated -- shown live.
    for group in GROUPS:
        rollout = summary["rollouts"][group]
        assert rollout["status"] == "completed"
        assert rollout["devices"] == {d: "activated" for d in members[group]}
    assert out.count("rollout completed") == len(GROUPS) + 1  # and the retrained canary
    assert "gate inference_errors: holds" in out and "gate latency_p95: holds" in out

    # Forged and tampered documents were refused, by the agent CLI and a running agent.
    assert sorted(r["reason"] for r in summary["refused"]) == [
        "hash_mismatch",
        "unknown_key",
        "wrong_device",
    ]
    assert out.count("refused as it should be") == 3

    # Drift from the drift API: line-b on the glare pixels only, line-a not at all.
    drift, glare = summary["drift"], set(summary["drifted_features"])
    drifted, calm = drift[summary["drifted_group"]], drift["line-a"]
    assert drifted["evaluated"] == drifted["drifted"] == AGENTS_PER_GROUP
    assert drifted["features_act"] and set(drifted["features_act"]) <= glare
    assert len(drifted["features_act"]) >= len(glare) // 2
    assert calm["evaluated"] == AGENTS_PER_GROUP and calm["drifted"] == 0
    assert calm["features_act"] == calm["features_warn"] == [] and calm["max_psi"] < 0.1
    assert drifted["inferences"] > 0 and calm["inferences"] > 0
    n = AGENTS_PER_GROUP
    assert f"drift line-b: {n} of {n} devices drifted" in out
    assert f"drift line-a: 0 of {n} devices drifted · features at act: none" in out

    # The drift alert opened for line-b, and no other alert is open.
    alert = summary["alert"]
    assert alert["group"] == "line-b" and alert["rule"] == "drift-line-b"
    assert alert["other_open"] == []
    # The labelled glare frames became a new version of the training data ...
    samples = summary["samples_dataset"]
    assert samples["version"] == samples["base_version"] + 1 and samples["added_rows"] > 0
    # ... the policy fired for line-b on its devices and glare pixels, trained on it ...
    retraining = summary["retraining"]
    assert retraining["group"] == "line-b"
    assert set(retraining["evidence_devices"]) == members["line-b"]
    assert retraining["evidence_features"] and set(retraining["evidence_features"]) <= glare
    candidate = retraining["candidate_version"]
    assert candidate == version + 1 and retraining["rollout_status"] == "completed"
    assert f"newer than v{samples['base_version']}" in out
    # ... and the candidate runs on line-b only, as the inventory says.
    assert {d: info["models"] for d, info in summary["devices"].items()} == {
        d: {MODEL_NAME: candidate if d in members["line-b"] else version} for d in agents
    }

    # Every agent got SIGTERM and exited by itself; none is left running.
    assert_stopped_cleanly(agents)
    assert f"{len(agents)} of {len(agents)} agents stopped cleanly" in out


@pytest.mark.slow
def test_ctrl_c_half_way_stops_every_agent(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo"
    demo = subprocess.Popen(
        [str(EXE), "demo", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
        cwd=tmp_path,
    )
    seen = []
    try:
        assert demo.stdout is not None
        # Until the agents are up and being streamed to, before any download is in flight
        # (an agent stopped mid-download waits for its block request to time out first).
        for line in demo.stdout:
            seen.append(line)
            if "streaming camera frames" in line:
                break
        else:
            pytest.fail("the demo ended before its agents ran:\n" + "".join(seen[-40:]))
        demo.send_signal(signal.SIGINT)
        rest, _ = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert demo.returncode == 130, "".join(seen[-20:]) + rest
    assert "interrupted" in rest
    summary = summary_of(data_dir)
    assert summary["completed"] is False
    assert_stopped_cleanly(summary["agents"])


def test_demo_refuses_a_folder_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("do not delete")
    result = subprocess.run(
        [str(EXE), "demo", "--exit-after", "0", "--data-dir", str(tmp_path / "precious")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "was not made by the demo" in result.stdout + result.stderr
    assert (tmp_path / "precious" / "thesis.tex").exists()

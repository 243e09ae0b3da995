"""A new user's path through the CLI and the API: add a CSV, train, see per-target artifacts
with size, metric, latency and gate results, promote, download a bundle and verify it as a
device would -- on a real server with its job runner, real TensorFlow, LiteRT and onnxruntime."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from typer.testing import CliRunner

from agent.cli import app as agent_cli
from server.app import create_app
from server.cli import app as edgefleet
from server.profiles import load_profiles
from server.settings import Settings
from tests.conftest import admin_token

runner = CliRunner()
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    data_dir = tmp_path / "data"
    port = free_port()
    api = uvicorn.Server(
        uvicorn.Config(
            create_app(Settings(data_dir=data_dir)),
            host="127.0.0.1",
            port=port,
            log_config=None,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=api.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not api.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    # The operator commands below use the admin token the dev-mode server made.
    monkeypatch.setenv("EDGEFLEET_TOKEN", admin_token(Settings(data_dir=data_dir)))
    yield f"http://127.0.0.1:{port}", data_dir
    api.should_exit = True
    thread.join(30)


def write_wine_csv(path: Path) -> None:
    from sklearn.datasets import load_wine

    wine = load_wine()
    names = [n.replace("/", "_") for n in wine.feature_names]
    lines = [",".join([*names, "cultivar"])]
    for row, target in zip(wine.data, wine.target, strict=True):
        lines.append(",".join([*(f"{v:g}" for v in row), wine.target_names[target]]))
    path.write_text("\n".join(lines) + "\n")


def cli(*args: str) -> str:
    result = runner.invoke(edgefleet, list(args), env={"COLUMNS": "220"})
    assert result.exit_code == 0, result.output
    return result.stdout


def test_csv_to_signed_per_target_bundles(server: tuple[str, Path], tmp_path: Path) -> None:
    url, data_dir = server
    csv = tmp_path / "wine.csv"
    write_wine_csv(csv)

    added = json.loads(
        cli(
            "datasets",
            "add",
            str(csv),
            "--name",
            "wine",
            "--label",
            "cultivar",
            "--json",
            "--server",
            url,
        )
    )
    assert added["version"] == 1 and added["rows"] == 178

    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,x\n2,y\n")
    refused = runner.invoke(
        edgefleet,
        ["datasets", "add", str(bad), "--name", "bad", "--label", "cultivar", "--server", url],
    )
    assert refused.exit_code != 0 and "cultivar" in refused.output

    trained = runner.invoke(
        edgefleet,
        [
            "train",
            "--dataset",
            "wine@1",
            "--model",
            "wine-mlp",
            "--arch",
            "mlp",
            "--epochs",
            "25",
            "--wait",
            "--server",
            url,
        ],
    )
    assert trained.exit_code == 0, trained.output

    version = json.loads(cli("models", "show", "wine-mlp", "1", "--json", "--server", url))
    assert version["status"] == "ready"
    assert version["lineage"]["dataset"] == "wine" and version["lineage"]["run_id"] is not None
    artifacts = {a["target"]: a for a in version["artifacts"]}
    assert set(artifacts) == set(load_profiles())
    for target, a in artifacts.items():
        assert a["error"] is None, (target, a["error"])
        assert a["size_bytes"] > 0 and a["latency_p50_ms"] > 0
        assert a["metric_name"] == "accuracy" and a["metric_value"] > 0.8, (target, a)
        assert a["ops"], target
    assert {a["format"] for a in artifacts.values()} == {"tflite", "onnx"}
    assert artifacts["edge-arm64-litert"]["quantization"] == "int8"
    assert any(a["gate_passed"] for a in artifacts.values())

    human = cli("models", "show", "wine-mlp", "1", "--server", url)
    assert "edge-arm64-litert" in human and "pass" in human
    promoted = json.loads(
        cli(
            "models", "promote", "wine-mlp", "1", "--alias", "production", "--json", "--server", url
        )
    )
    assert promoted == {"model": "wine-mlp", "alias": "production", "version": 1}

    # download the edge bundle and verify it as a device would, offline
    edge = artifacts["edge-arm64-litert"]
    bundle = tmp_path / "edge.efb"
    operator = {"Authorization": f"Bearer {admin_token(Settings(data_dir=data_dir))}"}
    download = httpx.get(url + edge["bundle_url"], headers=operator, timeout=30)
    assert download.status_code == 200, download.text
    bundle.write_bytes(download.content)
    keyring = tmp_path / "keyring.json"
    envelope = httpx.get(url + "/api/v1/keyring", timeout=30).json()["envelope"]
    keyring.write_text(json.dumps(envelope))
    verified = runner.invoke(
        agent_cli,
        [
            "verify",
            str(bundle),
            "--root-key",
            str(data_dir / "keys" / "root.pub"),
            "--keyring",
            str(keyring),
            "--sha256",
            edge["bundle_sha256"],
            "--length",
            str(edge["bundle_length"]),
            "--json",
        ],
    )
    assert verified.exit_code == 0, verified.output
    info = json.loads(verified.stdout)
    assert (info["model_name"], info["model_version"], info["target"]) == (
        "wine-mlp",
        1,
        "edge-arm64-litert",
    )

    cli("models", "note", "wine-mlp", "production", "first wine model", "--server", url)
    assert "notes: first wine model" in cli("models", "show", "wine-mlp", "1", "--server", url)

    runs = json.loads(cli("runs", "list", "--json", "--server", url))
    assert runs[0]["status"] == "succeeded"


def test_bring_your_own_model(server: tuple[str, Path], tmp_path: Path) -> None:
    """A .keras file and a zipped SavedModel go through the same evaluation, gates and signing."""
    import shutil

    import keras
    import numpy as np
    from sklearn.datasets import load_wine

    url, _ = server
    csv = tmp_path / "wine.csv"
    write_wine_csv(csv)
    cli("datasets", "add", str(csv), "--name", "wine", "--label", "cultivar", "--server", url)

    wine = load_wine()
    mean, std = wine.data.mean(axis=0), wine.data.std(axis=0)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((13,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit((wine.data - mean) / std, wine.target, epochs=60, verbose=0)
    model.save(tmp_path / "wine.keras")
    steps = json.dumps([{"op": "standardize", "mean": mean.tolist(), "std": std.tolist()}])

    imported = runner.invoke(
        edgefleet,
        [
            "models",
            "import",
            str(tmp_path / "wine.keras"),
            "--name",
            "wine-byo",
            "--dataset",
            "wine",
            "--preprocessing",
            steps,
            "--wait",
            "--json",
            "--server",
            url,
        ],
    )
    assert imported.exit_code == 0, imported.output
    version = json.loads(cli("models", "show", "wine-byo", "latest", "--json", "--server", url))
    assert version["source"] == "imported" and version["status"] == "ready"
    assert version["metrics"]["accuracy"] > 0.8
    assert all(a["error"] is None for a in version["artifacts"])
    assert any(a["gate_passed"] for a in version["artifacts"])

    # the same model as a zipped SavedModel
    model.export(tmp_path / "saved")
    shutil.make_archive(str(tmp_path / "saved"), "zip", tmp_path / "saved")
    (tmp_path / "steps.json").write_text(steps)
    again = runner.invoke(
        edgefleet,
        [
            "models",
            "import",
            str(tmp_path / "saved.zip"),
            "--name",
            "wine-byo",
            "--dataset",
            "wine",
            "--preprocessing",
            f"@{tmp_path / 'steps.json'}",
            "--wait",
            "--server",
            url,
        ],
        env={"COLUMNS": "200"},
    )
    assert again.exit_code == 0, again.output
    assert (
        json.loads(cli("models", "show", "wine-byo", "2", "--json", "--server", url))["status"]
        == "ready"
    )

    # not a model: refused at upload; a model that does not fit: the run fails saying why
    (tmp_path / "junk.keras").write_bytes(np.random.default_rng(0).bytes(2048))
    junk = runner.invoke(
        edgefleet,
        [
            "models",
            "import",
            str(tmp_path / "junk.keras"),
            "--name",
            "wine-byo",
            "--dataset",
            "wine",
            "--server",
            url,
        ],
    )
    assert junk.exit_code == 1 and "neither a .keras file nor a zipped SavedModel" in junk.output
    misfit = runner.invoke(
        edgefleet,
        [
            "models",
            "import",
            str(tmp_path / "wine.keras"),
            "--name",
            "wine-byo",
            "--dataset",
            "wine",
            "--preprocessing",
            '[{"op": "reshape", "shape": [13, 1]}]',
            "--wait",
            "--server",
            url,
        ],
    )
    assert misfit.exit_code == 1 and "does not accept the dataset's rows" in misfit.output

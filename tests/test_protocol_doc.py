"""docs/protocol.md is generated from shared/: it must be current, and its examples valid."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

from shared.bundle import check_target, read_bundle
from shared.messages import DesiredMessage
from shared.trust import TrustState, accept_desired

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "docs" / "generate_protocol.py"
DOCUMENT = REPO / "docs" / "protocol.md"
_JSON_BLOCK = re.compile(r"^```json\n(.*?)^```$", re.DOTALL | re.MULTILINE)


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate_protocol", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


@pytest.fixture(scope="module")
def rendered(generator: ModuleType) -> str:
    text: str = generator.render()
    return text


def test_protocol_doc_is_current(rendered: str) -> None:
    committed = DOCUMENT.read_text(encoding="utf-8") if DOCUMENT.exists() else ""
    assert committed == rendered, "docs/protocol.md is stale: run `make docs`"


def test_render_is_deterministic(generator: ModuleType, rendered: str) -> None:
    assert generator.render() == rendered


def test_every_example_payload_parses_with_its_message_class(
    generator: ModuleType, rendered: str
) -> None:
    classes = {cls.SCHEMA: cls for cls in generator.MESSAGE_CLASSES}
    seen: set[str] = set()
    for block in _JSON_BLOCK.findall(rendered):
        data = json.loads(block)
        if not isinstance(data, dict) or not isinstance(data.get("schema"), str):
            continue  # a JSON Schema, an envelope, a sketch: not a message payload
        cls = classes[data["schema"]]
        message = cls.from_dict(data)
        assert message.to_dict() == data, f"{cls.__name__} example does not round-trip"
        seen.add(cls.SCHEMA)
    assert seen == set(classes), f"no example shown for {sorted(set(classes) - seen)}"


def test_example_objects_survive_the_wire(generator: ModuleType) -> None:
    for name, message in generator.examples().items():
        again = type(message).from_bytes(message.to_bytes())
        assert again.to_dict() == message.to_dict(), name


def test_example_desired_message_is_accepted_with_the_example_root_key(
    generator: ModuleType,
) -> None:
    message = generator.examples()["desired"]
    assert isinstance(message, DesiredMessage)
    wire = DesiredMessage.from_bytes(message.to_bytes())
    state = TrustState.from_root_keys([generator.example_root_key().public])
    accepted = accept_desired(
        state, wire, device_id=generator.EXAMPLE_DEVICE_ID, now=generator.EXAMPLE_NOW
    )
    assert accepted.is_new
    assert accepted.desired.manifest_version == accepted.state.manifest_version
    assert accepted.state.manifest_signers == {generator.example_online_key().keyid}

    # The deployment points at the example bundle, which verifies with the keyring's keys.
    keyring = accepted.state.keyring
    assert keyring is not None
    deployment = accepted.desired.deployments[0]
    bundle = read_bundle(
        generator.example_bundle(),
        trusted_keys=keyring.verify_keys(),
        threshold=keyring.threshold,
        expected_sha256=deployment.artifact.sha256,
        expected_length=deployment.artifact.length,
    )
    check_target(
        bundle.manifest,
        model_name=deployment.model_name,
        model_version=deployment.model_version,
        target=deployment.target,
        runtimes=["litert"],
    )

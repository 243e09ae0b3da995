from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import load_config
from agent.errors import ConfigError
from shared.signing import SigningKey

GOOD = """
device_id = "cam-7"
profile = "edge-x86_64-litert"
data_dir = "state"
window_seconds = 30

[broker]
url = "mqtt://127.0.0.1:1999"
password_file = "secret"

[trust]
root_keys = ["root.pub"]
"""


def test_loads_and_resolves_relative_paths(tmp_path: Path) -> None:
    key = SigningKey.generate().public
    (tmp_path / "root.pub").write_text(key.to_base64())
    (tmp_path / "secret").write_text("s3cret\n")
    (tmp_path / "agent.toml").write_text(GOOD)
    config = load_config(tmp_path / "agent.toml")
    assert config.data_dir == tmp_path / "state"
    assert config.root_keys() == [key]
    assert config.broker is not None
    assert (config.broker.host, config.broker.port, config.broker.tls) == ("127.0.0.1", 1999, False)
    assert config.broker.resolved_password() == "s3cret"
    assert config.limits.outbox_max_rows > 0 and config.http.host == "127.0.0.1"


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (('device_id = "cam-7"', 'device_id = "cam/7"'), "device_id"),
        (("window_seconds = 30", "window_seconds = 0"), "window_seconds"),
        (('url = "mqtt://127.0.0.1:1999"', 'url = "http://x"'), "broker.url"),
        (("[trust]", "[trust]\nsurprise = 1"), "trust.surprise"),
        (("window_seconds = 30", "window_seconds = "), "not valid TOML"),
    ],
)
def test_bad_configs_name_the_field(tmp_path: Path, change: tuple[str, str], problem: str) -> None:
    (tmp_path / "agent.toml").write_text(GOOD.replace(*change))
    with pytest.raises(ConfigError, match=problem):
        load_config(tmp_path / "agent.toml")


def test_unusable_root_key(tmp_path: Path) -> None:
    (tmp_path / "agent.toml").write_text(GOOD)
    config = load_config(tmp_path / "agent.toml")
    with pytest.raises(ConfigError, match="root_keys"):
        config.root_keys()

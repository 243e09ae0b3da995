from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from server.settings import DEV_SECRET, Settings


def test_read_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDGEFLEET_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("EDGEFLEET_PORT", "9123")
    monkeypatch.setenv("EDGEFLEET_BROKER_URL", "mqtt://broker:1883")
    settings = Settings()
    assert settings.port == 9123 and settings.broker_url == "mqtt://broker:1883"
    assert settings.resolved_database_url == f"sqlite:///{(tmp_path / 'edgefleet.db').resolve()}"
    assert settings.keys_dir == tmp_path / "keys"


def test_production_refuses_the_development_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFLEET_MODE", "prod")
    with pytest.raises(ValidationError, match="development secret"):
        Settings()
    with pytest.raises(ValidationError, match="at least 32"):
        Settings(secret_key="short")  # type: ignore[arg-type]
    assert Settings(secret_key="x" * 40).mode == "prod"  # type: ignore[arg-type]
    assert Settings(mode="dev").secret_key.get_secret_value() == DEV_SECRET


def test_bad_values_name_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFLEET_PORT", "not-a-port")
    with pytest.raises(ValidationError, match="port"):
        Settings()

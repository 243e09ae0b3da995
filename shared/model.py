"""The base classes of every wire message.

What always holds:

- A :class:`Message` names its schema and major version in every payload
  (``"schema": "ef.telemetry", "schema_version": 1``). A reader refuses another
  schema or a newer major version with a :class:`~shared.errors.MessageError`.
- Fields a reader does not know are kept and written back unchanged
  (``extra="allow"`` on every model, nested ones included), so an older agent
  or server never strips what a newer peer added.
- A payload larger than its message's ``MAX_BYTES`` is refused *before* it is
  parsed; :meth:`Message.to_bytes` refuses to produce one.
- Payloads are parsed strictly (:func:`strict_json_loads`): a key twice in one
  object, NaN or Infinity anywhere (unknown fields included), or a missing
  ``schema`` / ``schema_version`` is refused.
- Encoding is compact UTF-8 JSON. NaN and infinities are not valid JSON: no
  model accepts them, so none is ever sent.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared.errors import MessageError, PayloadTooLargeError

__all__ = ["ContractModel", "Message", "describe_validation_error", "strict_json_loads"]


class ContractModel(BaseModel):
    """A part of a wire message: validated when built, unknown fields kept."""

    model_config = ConfigDict(
        extra="allow",
        populate_by_name=True,
        allow_inf_nan=False,
        validate_assignment=True,
    )


def _schema_constants(schema: dict[str, Any], model: type[BaseModel]) -> None:
    properties = schema.get("properties", {})
    name = getattr(model, "SCHEMA", None)
    if name is not None and "schema" in properties:
        properties["schema"]["const"] = name
        properties["schema"].pop("default", None)
        properties["schema_version"].pop("default", None)
        schema.setdefault("required", [])
        for key in ("schema", "schema_version"):
            if key not in schema["required"]:
                schema["required"].insert(0, key)
    limit = getattr(model, "MAX_BYTES", None)
    if limit is not None:
        schema["x-max-bytes"] = limit


class Message(ContractModel):
    """A top-level wire message (one MQTT payload or one signed document)."""

    model_config = ConfigDict(json_schema_extra=_schema_constants)

    SCHEMA: ClassVar[str]
    SCHEMA_VERSION: ClassVar[int] = 1
    MAX_BYTES: ClassVar[int] = 64 * 1024

    schema_name: str = Field(
        default="", alias="schema", description="Schema name; fixed per message type."
    )
    schema_version: int = Field(
        default=1, ge=1, description="Major version; readers refuse newer majors."
    )

    @model_validator(mode="before")
    @classmethod
    def _check_schema(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        name = data.get("schema", cls.SCHEMA)
        if name != cls.SCHEMA:
            raise ValueError(f"schema is {name!r}, expected {cls.SCHEMA!r}")
        version = data.get("schema_version", cls.SCHEMA_VERSION)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ValueError(f"schema_version must be a positive integer, not {version!r}")
        if version > cls.SCHEMA_VERSION:
            raise ValueError(
                f"{cls.SCHEMA} schema_version {version} is newer than this build "
                f"understands ({cls.SCHEMA_VERSION})"
            )
        return {**data, "schema": cls.SCHEMA, "schema_version": version}

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form, with aliases and unknown fields."""
        return self.model_dump(mode="json", by_alias=True)

    def to_bytes(self) -> bytes:
        """Compact UTF-8 JSON, refused if over ``MAX_BYTES`` or not finite."""
        try:
            raw = json.dumps(
                self.to_dict(), separators=(",", ":"), ensure_ascii=False, allow_nan=False
            ).encode("utf-8")
        except ValueError as e:
            raise MessageError(f"{self.SCHEMA} cannot be encoded: {e}") from e
        if len(raw) > self.MAX_BYTES:
            raise PayloadTooLargeError(self.SCHEMA, len(raw), self.MAX_BYTES)
        return raw

    @classmethod
    def from_bytes(cls, raw: bytes | bytearray | memoryview | str) -> Self:
        """Parse and validate one payload; the size limit is checked first."""
        data = raw.encode("utf-8") if isinstance(raw, str) else bytes(raw)
        if len(data) > cls.MAX_BYTES:
            raise PayloadTooLargeError(cls.SCHEMA, len(data), cls.MAX_BYTES)
        try:
            decoded = strict_json_loads(data)
        except ValueError as e:
            raise MessageError(f"invalid {cls.SCHEMA}: {e}") from e
        if not isinstance(decoded, dict):
            raise MessageError(f"invalid {cls.SCHEMA}: the payload is not a JSON object")
        missing = [k for k in ("schema", "schema_version") if k not in decoded]
        if missing:
            raise MessageError(f"invalid {cls.SCHEMA}: missing {' and '.join(missing)}")
        try:
            return cls.model_validate(decoded)
        except ValidationError as e:
            raise MessageError(f"invalid {cls.SCHEMA}: {describe_validation_error(e)}") from e

    @classmethod
    def from_dict(cls, data: Any) -> Self:
        """Validate an already-decoded object (no size limit applies)."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise MessageError(f"invalid {cls.SCHEMA}: {describe_validation_error(e)}") from e


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {key!r} appears twice in one object")
        result[key] = value
    return result


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def strict_json_loads(data: bytes | str) -> Any:
    """Parse JSON as RFC 8259 has it: no NaN or Infinity, and no key twice in an object.

    Parsers disagree on which of two equal keys wins; refusing them means a C device
    and the Python server can never read one signed document two ways.
    """
    try:
        return json.loads(data, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants)
    except UnicodeDecodeError as e:
        raise ValueError(f"the payload is not UTF-8: {e.reason}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e.msg} at line {e.lineno} column {e.colno}") from e


def describe_validation_error(error: ValidationError, limit: int = 8) -> str:
    """One line per problem, each naming the field path, at most ``limit`` of them."""
    parts = []
    for item in error.errors()[:limit]:
        where = ".".join(str(p) for p in item["loc"]) or "payload"
        parts.append(f"{where}: {item['msg']}")
    more = error.error_count() - limit
    if more > 0:
        parts.append(f"... and {more} more")
    return "; ".join(parts)

"""Ed25519 keys and DSSE-style signed envelopes.

An :class:`Envelope` carries a payload's exact bytes (base64), its type, and
signatures over ``PAE(payloadType, payload)`` -- the DSSE pre-authentication
encoding::

    "DSSEv1" SP len(type) SP type SP len(payload) SP payload

(lengths in ASCII decimal, ``SP`` one space). Binding the type stops a
signature on one kind of document from being replayed as another.

What always holds:

- :func:`verify_envelope` checks signatures over the exact bytes *before*
  anything parses the payload; it returns those bytes and nothing else.
- A key id is the lowercase hex SHA-256 of the raw 32-byte public key, so a
  device can compute it from the key alone.
- Each key counts once towards a threshold, however many times it signed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, ClassVar, Self

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from shared.errors import (
    BadSignatureError,
    MalformedError,
    ThresholdError,
    UnknownKeyError,
)
from shared.model import strict_json_loads

__all__ = [
    "Envelope",
    "PayloadType",
    "Signature",
    "SigningKey",
    "VerifyKey",
    "key_id",
    "pae",
    "sign_envelope",
    "verify_envelope",
    "verify_envelope_signers",
]

KeyId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
_B64 = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]*={0,2}$")]


class PayloadType:
    """The ``payloadType`` of each signed document edgefleet produces."""

    KEYRING = "application/vnd.edgefleet.keyring+json"
    DESIRED_STATE = "application/vnd.edgefleet.desired-state+json"
    BUNDLE = "application/vnd.edgefleet.bundle+json"


def key_id(public_key: bytes) -> str:
    """Key id of a raw 32-byte Ed25519 public key: hex SHA-256 of the key bytes."""
    if len(public_key) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, not {len(public_key)}")
    return hashlib.sha256(public_key).hexdigest()


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding: the bytes that are actually signed."""
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(type_bytes), type_bytes, len(payload), payload)


class VerifyKey:
    """An Ed25519 public key with its key id."""

    __slots__ = ("_key", "keyid", "raw")

    def __init__(self, raw: bytes) -> None:
        try:
            self._key = Ed25519PublicKey.from_public_bytes(raw)
        except ValueError as e:
            raise ValueError(f"not an Ed25519 public key: {e}") from e
        self.raw = bytes(raw)
        self.keyid = key_id(self.raw)

    @classmethod
    def from_base64(cls, text: str) -> Self:
        try:
            return cls(base64.b64decode(text, validate=True))
        except binascii.Error as e:
            raise ValueError(f"public key is not valid base64: {e}") from e

    def to_base64(self) -> str:
        return base64.b64encode(self.raw).decode("ascii")

    def verify(self, signature: bytes, message: bytes) -> bool:
        try:
            self._key.verify(signature, message)
        except InvalidSignature:
            return False
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VerifyKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"VerifyKey({self.keyid[:16]}...)"


class SigningKey:
    """An Ed25519 private key. Its text form is the base64 of the 32-byte seed."""

    __slots__ = ("_key", "public")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public = VerifyKey(
            private_key.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
        )

    @classmethod
    def generate(cls) -> Self:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Self:
        if len(seed) != 32:
            raise ValueError(f"an Ed25519 seed is 32 bytes, not {len(seed)}")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def from_base64(cls, text: str) -> Self:
        try:
            return cls.from_seed(base64.b64decode(text.strip(), validate=True))
        except binascii.Error as e:
            raise ValueError(f"private key is not valid base64: {e}") from e

    def seed_base64(self) -> str:
        seed = self._key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return base64.b64encode(seed).decode("ascii")

    @property
    def keyid(self) -> str:
        return self.public.keyid

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def __repr__(self) -> str:
        return f"SigningKey({self.keyid[:16]}...)"


class Signature(BaseModel):
    model_config = ConfigDict(extra="allow")

    keyid: KeyId
    sig: _B64 = Field(description="base64 Ed25519 signature over PAE(payloadType, payload)")


class Envelope(BaseModel):
    """A DSSE envelope: ``{"payloadType", "payload", "signatures"}``."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    MAX_BYTES: ClassVar[int] = 512 * 1024

    payload_type: str = Field(alias="payloadType", min_length=1, max_length=128)
    payload: _B64 = Field(description="base64 of the exact signed payload bytes")
    signatures: list[Signature] = Field(default_factory=list, max_length=16)

    def to_bytes(self) -> bytes:
        return json.dumps(
            self.model_dump(mode="json", by_alias=True), separators=(",", ":")
        ).encode("utf-8")

    @classmethod
    def from_bytes(
        cls, raw: bytes | bytearray | memoryview | str, *, max_bytes: int | None = None
    ) -> Self:
        """Parse the envelope's JSON (not its payload), or raise :class:`MalformedError`."""
        data = raw.encode("utf-8") if isinstance(raw, str) else bytes(raw)
        limit = cls.MAX_BYTES if max_bytes is None else max_bytes
        if len(data) > limit:
            raise MalformedError(f"signed envelope is {len(data)} bytes, over the limit of {limit}")
        try:
            return cls.model_validate(strict_json_loads(data))
        except ValueError as e:
            if isinstance(e, ValidationError):
                first = e.errors()[0]
                where = ".".join(str(p) for p in first["loc"]) or "envelope"
                raise MalformedError(f"not a signed envelope: {where}: {first['msg']}") from e
            raise MalformedError(f"not a signed envelope: {e}") from e

    def payload_bytes(self) -> bytes:
        """The payload, decoded but **not verified**; use :func:`verify_envelope`."""
        return _strict_b64decode(self.payload, "envelope payload")


def _strict_b64decode(text: str, what: str) -> bytes:
    """Decode canonical base64 only: unused padding bits must be zero.

    Without this, several texts decode to the same bytes, and a document could be
    altered without breaking its signature.
    """
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error as e:
        raise MalformedError(f"{what} is not valid base64: {e}") from e
    if base64.b64encode(raw).decode("ascii") != text:
        raise MalformedError(f"{what} is not canonical base64")
    return raw


def sign_envelope(payload: bytes, payload_type: str, keys: Sequence[SigningKey]) -> Envelope:
    """Sign the exact ``payload`` bytes with each of ``keys``."""
    if not keys:
        raise ValueError("at least one signing key is needed")
    message = pae(payload_type, payload)
    return Envelope(
        payload_type=payload_type,
        payload=base64.b64encode(payload).decode("ascii"),
        signatures=[
            Signature(keyid=k.keyid, sig=base64.b64encode(k.sign(message)).decode("ascii"))
            for k in keys
        ],
    )


def verify_envelope(
    envelope: Envelope,
    *,
    payload_type: str,
    trusted_keys: Mapping[str, VerifyKey] | Iterable[VerifyKey],
    threshold: int = 1,
) -> bytes:
    """Return the payload bytes if at least ``threshold`` trusted keys signed them.

    See :func:`verify_envelope_signers` for the errors.
    """
    payload, _ = verify_envelope_signers(
        envelope, payload_type=payload_type, trusted_keys=trusted_keys, threshold=threshold
    )
    return payload


def verify_envelope_signers(
    envelope: Envelope,
    *,
    payload_type: str,
    trusted_keys: Mapping[str, VerifyKey] | Iterable[VerifyKey],
    threshold: int = 1,
) -> tuple[bytes, frozenset[str]]:
    """Return the payload bytes and the ids of the trusted keys whose signatures verified.

    Raises :class:`MalformedError` for a wrong payload type, :class:`UnknownKeyError`
    when no signature comes from a trusted key, :class:`BadSignatureError` when a
    trusted key's signature does not verify (or there is none at all), and
    :class:`ThresholdError` when fewer distinct trusted keys than ``threshold``
    produced valid signatures.
    """
    if threshold < 1:
        raise ValueError("threshold must be at least 1")
    keys = (
        dict(trusted_keys)
        if isinstance(trusted_keys, Mapping)
        else {k.keyid: k for k in trusted_keys}
    )
    if envelope.payload_type != payload_type:
        raise MalformedError(
            f"payload type is {envelope.payload_type!r}, expected {payload_type!r}"
        )
    payload = envelope.payload_bytes()
    if not envelope.signatures:
        raise BadSignatureError("the document is not signed")
    message = pae(payload_type, payload)
    valid: set[str] = set()
    known_but_bad: list[str] = []
    unknown: list[str] = []
    for signature in envelope.signatures:
        key = keys.get(signature.keyid)
        if key is None:
            unknown.append(signature.keyid)
            continue
        try:
            raw_sig = _strict_b64decode(signature.sig, "signature")
        except MalformedError:
            known_but_bad.append(signature.keyid)
            continue
        if key.verify(raw_sig, message):
            valid.add(signature.keyid)
        else:
            known_but_bad.append(signature.keyid)
    if len(valid) >= threshold:
        return payload, frozenset(valid)
    if valid:
        raise ThresholdError(f"{len(valid)} distinct trusted key(s) signed, {threshold} required")
    if known_but_bad:
        raise BadSignatureError(
            f"signature by key {known_but_bad[0][:16]}... does not match the payload"
        )
    raise UnknownKeyError(
        f"signed only by unknown key(s): {', '.join(k[:16] + '...' for k in unknown)}"
    )

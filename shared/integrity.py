"""Length and SHA-256 checks on a stream, enforced while it is read.

:class:`StreamVerifier` is fed chunks as they arrive. It refuses the first byte
past the expected length at once -- an endless or oversized stream is cut off
there, not after it has filled a disk -- and checks the hash when the stream ends.
"""

from __future__ import annotations

import hashlib
import re

from shared.errors import HashMismatchError, LengthMismatchError

__all__ = ["StreamVerifier", "sha256_hex", "verify_bytes"]

_SHA256 = re.compile(r"[0-9a-f]{64}")


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


class StreamVerifier:
    """Checks that a stream is exactly ``expected_length`` bytes with ``expected_sha256``."""

    def __init__(self, expected_length: int, expected_sha256: str) -> None:
        if expected_length < 0:
            raise ValueError("expected_length must not be negative")
        if not _SHA256.fullmatch(expected_sha256):
            raise ValueError("expected_sha256 must be 64 lowercase hex characters")
        self.expected_length = expected_length
        self.expected_sha256 = expected_sha256
        self.received = 0
        self._hash = hashlib.sha256()

    @property
    def remaining(self) -> int:
        return self.expected_length - self.received

    def update(self, chunk: bytes | bytearray | memoryview) -> None:
        """Add a chunk; raise :class:`LengthMismatchError` if it goes past the length."""
        if self.received + len(chunk) > self.expected_length:
            raise LengthMismatchError(
                f"stream goes past its signed length of {self.expected_length} bytes"
            )
        self.received += len(chunk)
        self._hash.update(chunk)

    def finish(self) -> None:
        """Raise unless exactly the expected bytes were seen."""
        if self.received != self.expected_length:
            raise LengthMismatchError(
                f"stream ended after {self.received} bytes, {self.expected_length} were signed"
            )
        actual = self._hash.hexdigest()
        if actual != self.expected_sha256:
            raise HashMismatchError(
                f"sha256 is {actual[:16]}..., the signed value is {self.expected_sha256[:16]}..."
            )


def verify_bytes(data: bytes | bytearray | memoryview, length: int, sha256: str) -> None:
    verifier = StreamVerifier(length, sha256)
    verifier.update(data)
    verifier.finish()

"""The exceptions of the wire contract.

Every error that ``shared`` raises derives from :class:`ContractError`, so a caller
can catch the whole package with one ``except``. The tree keeps *bad data* apart
from *trust failures*; transport faults never originate here because ``shared``
does no I/O::

    ContractError
    ├── TopicError                 a device id or topic that is not ours
    ├── MessageError               a payload that is not a valid message
    │   └── PayloadTooLargeError   ... rejected on size, before any parsing
    ├── BundleFormatError          a bundle file that is not a well-formed bundle
    ├── DriftError                 drift inputs that do not fit their reference
    ├── WheelError                 an agent wheel a device must not install (``reason``)
    └── VerificationError          a trust check failed; ``reason`` says which
        ├── MalformedError         (reason ``malformed``: not a signed document)
        ├── BadSignatureError      (``bad_signature``)
        ├── UnknownKeyError        (``unknown_key``)
        ├── ThresholdError         (``threshold_not_met``)
        ├── ExpiredError           (``expired``)
        ├── RollbackError          (``rollback``)
        ├── WrongDeviceError       (``wrong_device``)
        ├── WrongTargetError       (``wrong_target``)
        ├── LengthMismatchError    (``length_mismatch``)
        └── HashMismatchError      (``hash_mismatch``)

A :class:`VerificationError`'s ``reason`` is a :class:`RejectReason`, the same code
an agent reports in its ``rejected`` event, so the server, the CLI and the
dashboard speak of one failure by one name.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "BadSignatureError",
    "BundleFormatError",
    "ContractError",
    "DriftError",
    "ExpiredError",
    "HashMismatchError",
    "LengthMismatchError",
    "MalformedError",
    "MessageError",
    "PayloadTooLargeError",
    "RejectReason",
    "RollbackError",
    "ThresholdError",
    "TopicError",
    "UnknownKeyError",
    "VerificationError",
    "WrongDeviceError",
    "WrongTargetError",
]


class RejectReason(StrEnum):
    """Why a signed document or an artifact was refused (wire value = enum value)."""

    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_KEY = "unknown_key"
    THRESHOLD_NOT_MET = "threshold_not_met"
    EXPIRED = "expired"
    ROLLBACK = "rollback"
    WRONG_DEVICE = "wrong_device"
    WRONG_TARGET = "wrong_target"
    LENGTH_MISMATCH = "length_mismatch"
    HASH_MISMATCH = "hash_mismatch"
    MALFORMED = "malformed"


class ContractError(Exception):
    """Root of every error raised by the ``shared`` package."""


class TopicError(ContractError, ValueError):
    """A device id or an MQTT topic does not follow the contract."""


class MessageError(ContractError, ValueError):
    """A payload is not a valid message of the expected schema."""


class PayloadTooLargeError(MessageError):
    """A payload exceeds its message's size limit; it was not parsed."""

    def __init__(self, schema: str, size: int, limit: int) -> None:
        super().__init__(f"{schema} payload is {size} bytes, over its limit of {limit} bytes")
        self.size = size
        self.limit = limit


class BundleFormatError(ContractError, ValueError):
    """A bundle file is not a well-formed edgefleet bundle."""


class DriftError(ContractError, ValueError):
    """Drift inputs do not fit the reference they are measured against."""


class VerificationError(ContractError):
    """A trust check failed. ``reason`` names which check, as a wire code."""

    reason: RejectReason = RejectReason.MALFORMED

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class MalformedError(VerificationError):
    reason = RejectReason.MALFORMED


class BadSignatureError(VerificationError):
    reason = RejectReason.BAD_SIGNATURE


class UnknownKeyError(VerificationError):
    reason = RejectReason.UNKNOWN_KEY


class ThresholdError(VerificationError):
    reason = RejectReason.THRESHOLD_NOT_MET


class ExpiredError(VerificationError):
    reason = RejectReason.EXPIRED


class RollbackError(VerificationError):
    reason = RejectReason.ROLLBACK


class WrongDeviceError(VerificationError):
    reason = RejectReason.WRONG_DEVICE


class WrongTargetError(VerificationError):
    reason = RejectReason.WRONG_TARGET


class LengthMismatchError(VerificationError):
    reason = RejectReason.LENGTH_MISMATCH


class HashMismatchError(VerificationError):
    reason = RejectReason.HASH_MISMATCH

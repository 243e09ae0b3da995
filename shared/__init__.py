"""edgefleet's wire contract: what the agent and the server both speak.

Topics (:mod:`shared.topics`), message schemas (:mod:`shared.messages`), signed
envelopes and keys (:mod:`shared.signing`), the trust rules a device applies
(:mod:`shared.trust`), the model bundle (:mod:`shared.bundle`), stream integrity
(:mod:`shared.integrity`), preprocessing (:mod:`shared.preprocessing`), latency
histograms (:mod:`shared.latency`) and drift sketches (:mod:`shared.drift`).

This package is small and pure: it imports only the standard library, numpy,
pydantic and cryptography, and does no I/O beyond the file objects handed to it.
Every error it raises derives from :class:`shared.errors.ContractError`.
"""

from shared.errors import ContractError, RejectReason, VerificationError

__all__ = ["PROTOCOL_VERSION", "ContractError", "RejectReason", "VerificationError"]

PROTOCOL_VERSION = "ef/v1"

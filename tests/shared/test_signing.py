"""DSSE envelopes: exact-bytes signatures, typed failures, thresholds."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import (
    BadSignatureError,
    MalformedError,
    ThresholdError,
    UnknownKeyError,
    VerificationError,
)
from shared.signing import (
    Envelope,
    PayloadType,
    SigningKey,
    VerifyKey,
    key_id,
    pae,
    sign_envelope,
    verify_envelope,
    verify_envelope_signers,
)
from tests.shared.conftest import key

PAYLOAD = b'{"hello":"fleet"}'
TYPE = PayloadType.DESIRED_STATE


def test_pae_is_the_dsse_encoding() -> None:
    assert pae("t", b"ab") == b"DSSEv1 1 t 2 ab"
    assert pae(TYPE, b"") == b"DSSEv1 %d %b 0 " % (len(TYPE), TYPE.encode())


def test_key_id_is_sha256_of_raw_public_key() -> None:
    import hashlib

    k = key("a")
    assert k.keyid == hashlib.sha256(k.public.raw).hexdigest() == key_id(k.public.raw)
    with pytest.raises(ValueError):
        key_id(b"short")


def test_keys_serialise_and_load() -> None:
    k = SigningKey.generate()
    again = SigningKey.from_base64(k.seed_base64())
    assert again.keyid == k.keyid
    assert VerifyKey.from_base64(k.public.to_base64()) == k.public
    with pytest.raises(ValueError):
        SigningKey.from_base64("not base64!!")
    with pytest.raises(ValueError):
        VerifyKey.from_base64(base64.b64encode(b"x" * 31).decode())


def test_sign_and_verify_returns_the_exact_bytes() -> None:
    k = key("a")
    envelope = Envelope.from_bytes(sign_envelope(PAYLOAD, TYPE, [k]).to_bytes())
    assert verify_envelope(envelope, payload_type=TYPE, trusted_keys=[k.public]) == PAYLOAD
    payload, signers = verify_envelope_signers(
        envelope, payload_type=TYPE, trusted_keys={k.keyid: k.public}
    )
    assert payload == PAYLOAD and signers == {k.keyid}


def test_wrong_payload_type_is_refused() -> None:
    k = key("a")
    envelope = sign_envelope(PAYLOAD, PayloadType.KEYRING, [k])
    with pytest.raises(MalformedError, match="payload type"):
        verify_envelope(envelope, payload_type=TYPE, trusted_keys=[k.public])
    # relabelling the envelope breaks the signature, because the type is signed too
    relabelled = envelope.model_copy(update={"payload_type": TYPE})
    with pytest.raises(BadSignatureError):
        verify_envelope(relabelled, payload_type=TYPE, trusted_keys=[k.public])


def test_unsigned_unknown_and_bad_signatures() -> None:
    a, b = key("a"), key("b")
    unsigned = Envelope(payloadType=TYPE, payload=base64.b64encode(PAYLOAD).decode())
    with pytest.raises(BadSignatureError, match="not signed"):
        verify_envelope(unsigned, payload_type=TYPE, trusted_keys=[a.public])
    with pytest.raises(UnknownKeyError):
        verify_envelope(
            sign_envelope(PAYLOAD, TYPE, [b]), payload_type=TYPE, trusted_keys=[a.public]
        )
    forged = sign_envelope(PAYLOAD, TYPE, [b])
    forged.signatures[0].keyid = a.keyid  # claims to be a, signed by b
    with pytest.raises(BadSignatureError):
        verify_envelope(forged, payload_type=TYPE, trusted_keys=[a.public])
    bad_b64 = sign_envelope(PAYLOAD, TYPE, [a])
    bad_b64.signatures[0].sig = "AAAA"
    with pytest.raises(BadSignatureError):
        verify_envelope(bad_b64, payload_type=TYPE, trusted_keys=[a.public])


def test_the_same_key_twice_does_not_meet_a_threshold_of_two() -> None:
    a, b = key("a"), key("b")
    twice = sign_envelope(PAYLOAD, TYPE, [a, a])
    with pytest.raises(ThresholdError, match="1 distinct"):
        verify_envelope(twice, payload_type=TYPE, trusted_keys=[a.public, b.public], threshold=2)
    both = sign_envelope(PAYLOAD, TYPE, [a, b])
    assert verify_envelope(both, payload_type=TYPE, trusted_keys=[a.public, b.public], threshold=2)


def test_one_good_signature_among_bad_ones_is_enough_for_threshold_one() -> None:
    a, b = key("a"), key("b")
    envelope = sign_envelope(PAYLOAD, TYPE, [b, a])
    envelope.signatures[0].sig = envelope.signatures[1].sig  # b's slot now holds a's sig
    assert verify_envelope(envelope, payload_type=TYPE, trusted_keys=[a.public, b.public])


@pytest.mark.parametrize(
    "raw",
    [b"", b"{}", b"[]", b"nope", b'{"payloadType":"x","payload":"***","signatures":[]}'],
)
def test_malformed_envelopes(raw: bytes) -> None:
    with pytest.raises(MalformedError):
        Envelope.from_bytes(raw)


def test_oversized_envelope_is_refused_unparsed() -> None:
    with pytest.raises(MalformedError, match="over the limit"):
        Envelope.from_bytes(b" " * (Envelope.MAX_BYTES + 1))


def _flip(data: bytes, index: int, bit: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 1 << bit
    return bytes(out)


SIGNED = sign_envelope(PAYLOAD, TYPE, [key("a")]).to_bytes()


@settings(max_examples=300)
@given(index=st.integers(0, len(SIGNED) - 1), bit=st.integers(0, 7))
def test_flipping_any_bit_of_a_signed_envelope_fails_verification(index: int, bit: int) -> None:
    tampered = _flip(SIGNED, index, bit)
    try:
        envelope = Envelope.from_bytes(tampered)
        payload = verify_envelope(envelope, payload_type=TYPE, trusted_keys=[key("a").public])
    except VerificationError:
        return
    # A flip that survives must leave the signed content untouched: only JSON-level
    # changes such as a key's case could do that, and those do not parse above.
    assert payload == PAYLOAD
    assert json.loads(tampered) != json.loads(SIGNED) or tampered == SIGNED
    pytest.fail(f"flip at byte {index} bit {bit} was accepted")


def test_envelopes_with_a_key_twice_are_malformed() -> None:
    raw = sign_envelope(PAYLOAD, TYPE, [key("a")]).to_bytes()
    doubled = raw.replace(b'{"payloadType":', b'{"payloadType":"x","payloadType":', 1)
    with pytest.raises(MalformedError, match="twice"):
        Envelope.from_bytes(doubled)

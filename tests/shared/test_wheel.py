"""The agent wheel check both the server (publish) and the device (install) run: a good
wheel is described, and each rule refuses once, with the reason a device reports and a
message naming the problem.

Wheels are real zips built here entry by entry, so each test breaks exactly one thing.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import stat
import warnings
import zipfile
from collections.abc import Callable

import pytest

from shared.errors import ContractError, RejectReason
from shared.wheel import (
    REQUIRED_FILES,
    RecordEntry,
    WheelError,
    WheelFacts,
    WheelLimits,
    inspect_wheel,
    member_chunks,
    open_wheel,
)

INFO = "edgefleet-0.2.0.dist-info"
Files = dict[str, bytes]


def base_files(version: str = "0.2.0", info: str = INFO) -> Files:
    """The files of a minimal agent wheel, without RECORD."""
    return {
        "agent/__init__.py": f'__version__ = "{version}"\n'.encode(),
        "agent/cli.py": b"def main() -> None: ...\n",
        "shared/__init__.py": b'"""shared."""\n',
        f"{info}/METADATA": (
            f"Metadata-Version: 2.1\nName: edgefleet\nVersion: {version}\n"
            "Requires-Python: >=3.11\n\n"
        ).encode(),
        f"{info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n\n"
        ),
    }


def record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def record_of(files: Files, info: str = INFO) -> str:
    rows = [f"{path},{record_hash(data)},{len(data)}" for path, data in files.items()]
    return "\n".join([*rows, f"{info}/RECORD,,"]) + "\n"


def pack(
    files: Files,
    *,
    info: str = INFO,
    record: str | None = None,
    after_record: Files | None = None,
    entries: list[tuple[zipfile.ZipInfo, bytes]] | None = None,
    compression: int = zipfile.ZIP_DEFLATED,
) -> bytes:
    """A zip of ``files`` plus a RECORD of them (``record``: that text instead);
    ``after_record`` files are added unlisted, ``entries`` as raw zip entries."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns of duplicate names
        for path, data in files.items():
            archive.writestr(path, data)
        for path, data in (after_record or {}).items():
            archive.writestr(path, data)
        for info_entry, data in entries or []:
            archive.writestr(info_entry, data)
        archive.writestr(f"{info}/RECORD", record_of(files, info) if record is None else record)
    return out.getvalue()


def check(data: bytes, **kwargs: object) -> WheelFacts:
    with open_wheel(io.BytesIO(data)) as archive:
        return inspect_wheel(archive, **kwargs)  # type: ignore[arg-type]


def refused(data: bytes, **kwargs: object) -> WheelError:
    with pytest.raises(WheelError) as caught:
        check(data, **kwargs)
    return caught.value


# ----------------------------------------------------------------------------- the good wheel


def test_a_good_wheel_is_described() -> None:
    files = base_files()
    facts = check(pack(files), expected_version="0.2.0")
    assert (facts.version, facts.dist_info) == ("0.2.0", INFO)
    assert facts.files == len(files) + 1  # and RECORD
    assert facts.unpacked_bytes == sum(map(len, files.values())) + len(record_of(files))
    assert facts.tags == ("py3-none-any",)
    assert facts.requires_python == ">=3.11"
    assert facts.record_name == f"{INFO}/RECORD"
    assert set(facts.record) == set(files)
    cli = files["agent/cli.py"]
    assert facts.record["agent/cli.py"] == RecordEntry(record_hash(cli)[7:], len(cli))


def test_folders_a_normalized_name_and_an_empty_size_are_accepted() -> None:
    files = base_files()
    files[f"{INFO}/METADATA"] = files[f"{INFO}/METADATA"].replace(b"edgefleet", b"EdgeFleet")
    record = record_of(files).replace(f",{len(files['agent/cli.py'])}\n", ",\n", 1)
    folder = zipfile.ZipInfo("agent/")
    folder.external_attr = (stat.S_IFDIR | 0o755) << 16
    facts = check(pack(files, record=record, entries=[(folder, b"")]))
    assert facts.files == len(files) + 1  # the folder is an entry, not a file


def test_a_wheel_that_is_an_error_is_a_contract_error_and_a_value_error() -> None:
    error = refused(b"PK\x03\x04 not really a zip")
    assert isinstance(error, ContractError) and isinstance(error, ValueError)
    assert error.reason == RejectReason.MALFORMED
    assert "not a wheel: the file is not a zip archive" in str(error) == error.message


# ----------------------------------------------------------------------------- limits


def test_the_wheel_file_size_is_bounded_unless_the_caller_bounded_it() -> None:
    data = pack(base_files())
    with pytest.raises(WheelError, match=f"{len(data)} bytes, over the limit of 100"):
        open_wheel(io.BytesIO(data), limits=WheelLimits(max_wheel_bytes=100))
    with open_wheel(io.BytesIO(data), limits=WheelLimits(max_wheel_bytes=None)) as archive:
        assert inspect_wheel(archive).version == "0.2.0"


def test_entries_are_bounded_folders_included() -> None:
    folder = zipfile.ZipInfo("agent/")
    data = pack(base_files(), entries=[(folder, b"")])  # 5 files, RECORD, a folder
    assert check(data, limits=WheelLimits(max_entries=7)).files == 6
    error = refused(data, limits=WheelLimits(max_entries=6))
    assert "the wheel has 7 entries, over the limit of 6" in error.message


def test_the_unpacked_size_is_bounded_by_what_the_entries_state() -> None:
    files = base_files()
    files["agent/blob.bin"] = b"\0" * 5000  # deflates to a few bytes
    data = pack(files)
    assert len(data) < 5000
    error = refused(data, limits=WheelLimits(max_unpacked_bytes=5000))
    assert "more than the limit of 5000" in error.message
    assert error.reason == RejectReason.MALFORMED


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_entries must be positive"):
        WheelLimits(max_entries=0)
    with pytest.raises(ValueError, match="max_unpacked_bytes must be positive"):
        WheelLimits(max_unpacked_bytes=-1)


# ----------------------------------------------------------------------------- entries


@pytest.mark.parametrize(
    "name",
    ["../escape.py", "/etc/edgefleet.py", "agent\\evil.py", "agent/./x.py", "agent//x.py",
     "c:/x.py", "agent/../../x.py"],
)  # fmt: skip
def test_an_unsafe_path_is_refused(name: str) -> None:
    files = base_files()
    files[name] = b"x = 1\n"  # listed in RECORD with its true hash
    error = refused(pack(files))
    assert error.reason == RejectReason.MALFORMED
    assert f"unsafe path {name!r}: not a path inside the wheel" in error.message


def test_a_symlink_entry_is_refused() -> None:
    link = zipfile.ZipInfo("agent/link.py")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    error = refused(pack(base_files(), entries=[(link, b"/etc/passwd")]))
    assert "agent/link.py is not a plain file" in error.message


def test_a_path_twice_is_refused() -> None:
    error = refused(pack(base_files(), entries=[(zipfile.ZipInfo("agent/cli.py"), b"x = 2\n")]))
    assert "agent/cli.py is in the wheel twice" in error.message


def test_a_damaged_member_is_refused() -> None:
    files = base_files()
    data = bytearray(pack(files, compression=zipfile.ZIP_STORED))
    at = bytes(data).index(files["agent/cli.py"])
    data[at] ^= 0xFF  # the CRC no longer matches
    error = refused(bytes(data))
    assert "agent/cli.py is unreadable" in error.message and error.reason == "malformed"


# ----------------------------------------------------------------------------- dist-info


def with_info(info: str, version: str = "0.2.0") -> bytes:
    return pack(base_files(version, info), info=info)


@pytest.mark.parametrize(
    ("data", "reason", "problem"),
    [
        (
            pack({k: v for k, v in base_files().items() if not k.startswith(INFO)}, info="x"),
            RejectReason.MALFORMED,
            "no <name>-<version>.dist-info folder",
        ),
        (
            pack({**base_files(), "other-1.0.dist-info/METADATA": b"Name: other\n"}),
            RejectReason.MALFORMED,
            "more than one .dist-info folder: edgefleet-0.2.0.dist-info, other-1.0.dist-info",
        ),
        (with_info("edgefleet.dist-info"), RejectReason.MALFORMED, "is not named <name>-"),
        (
            with_info("otherpkg-0.2.0.dist-info"),
            RejectReason.WRONG_TARGET,
            "the wheel is of the distribution 'otherpkg', not 'edgefleet'",
        ),
        (
            with_info("edgefleet-latest.dist-info", "latest"),
            RejectReason.MALFORMED,
            "'latest' is not a version an agent can report",
        ),
        (
            with_info("Edgefleet-0.2.0.dist-info"),
            RejectReason.MALFORMED,
            "must be named edgefleet-0.2.0",
        ),
        (
            pack({**base_files(), "edgefleet-0.2.0.data/scripts/x": b"#!/bin/sh\n"}),
            RejectReason.WRONG_TARGET,
            "installs outside the package folder (edgefleet-0.2.0.data/)",
        ),
    ],
    ids=["none", "two", "unnamed", "other-name", "bad-version", "not-normalized", "data"],
)
def test_one_dist_info_folder_of_edgefleet_at_a_valid_version(
    data: bytes, reason: RejectReason, problem: str
) -> None:
    error = refused(data)
    assert error.reason == reason
    assert problem in error.message


def test_the_version_asked_for_is_the_version_of_the_wheel() -> None:
    data = pack(base_files())
    assert check(data, expected_version="0.2.0").version == "0.2.0"
    error = refused(data, expected_version="0.3.0")
    assert error.reason == RejectReason.WRONG_TARGET
    assert "the wheel is version '0.2.0'; '0.3.0' was asked for" in error.message


# ----------------------------------------------------------------------------- WHEEL, METADATA


def edit(name: str, old: bytes, new: bytes) -> Callable[[], bytes]:
    def build() -> bytes:
        files = base_files()
        path = f"{INFO}/{name}"
        assert old in files[path]
        files[path] = files[path].replace(old, new)
        return pack(files)

    return build


def without(path: str) -> Callable[[], bytes]:
    def build() -> bytes:
        files = base_files()
        del files[path]
        return pack(files)

    return build


@pytest.mark.parametrize(
    ("build", "reason", "problem"),
    [
        (without(f"{INFO}/WHEEL"), RejectReason.MALFORMED, f"the wheel has no {INFO}/WHEEL"),
        (
            edit("WHEEL", b"Root-Is-Purelib: true", b"Root-Is-Purelib: false"),
            RejectReason.WRONG_TARGET,
            "not pure-Python: WHEEL does not say 'Root-Is-Purelib: true'",
        ),
        (
            edit("WHEEL", b"Tag: py3-none-any", b"Tag: cp311-cp311-linux_x86_64"),
            RejectReason.WRONG_TARGET,
            "WHEEL tags cp311-cp311-linux_x86_64 are not all '*-none-any'",
        ),
        (
            edit("WHEEL", b"Tag: py3-none-any\n", b""),
            RejectReason.WRONG_TARGET,
            "WHEEL tags (none) are not all",
        ),
        (without(f"{INFO}/METADATA"), RejectReason.MALFORMED, f"the wheel has no {INFO}/METADATA"),
        (
            edit("METADATA", b"Name: edgefleet", b"Name: other-agent"),
            RejectReason.WRONG_TARGET,
            "METADATA names the distribution 'other-agent', not 'edgefleet'",
        ),
        (
            edit("METADATA", b"Version: 0.2.0", b"Version: 0.3.0"),
            RejectReason.WRONG_TARGET,
            f"METADATA says version '0.3.0' but the folder is {INFO}",
        ),
        (
            edit("METADATA", b"Requires-Python", b"Summary: \xff\xfe\nRequires-Python"),
            RejectReason.MALFORMED,
            "METADATA is not UTF-8 text",
        ),
    ],
    ids=[
        "no-wheel", "platlib", "platform-tag", "no-tag", "no-metadata", "other-name",
        "other-version", "not-utf8",
    ],
)  # fmt: skip
def test_wheel_and_metadata_say_a_pure_python_edgefleet_of_that_version(
    build: Callable[[], bytes], reason: RejectReason, problem: str
) -> None:
    error = refused(build())
    assert error.reason == reason
    assert problem in error.message


@pytest.mark.parametrize("required", REQUIRED_FILES)
def test_the_agent_and_shared_packages_and_the_cli_the_launcher_runs_are_required(
    required: str,
) -> None:
    error = refused(without(required)())
    assert error.reason == RejectReason.MALFORMED
    assert f"the wheel has no {required}" in error.message
    assert "it is not a wheel of the agent" in error.message


# ----------------------------------------------------------------------------- RECORD


def test_record_is_required() -> None:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for path, data in base_files().items():
            archive.writestr(path, data)
    assert f"the wheel has no {INFO}/RECORD" in refused(out.getvalue()).message


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda text: text + "agent/x.py,sha256=abc\n", "a row has 2 fields, not 3"),
        (
            lambda text: text.replace("agent/cli.py,sha256=", "agent/cli.py,md5=", 1),
            f"{INFO}/RECORD gives agent/cli.py no sha256 hash",
        ),
        (
            lambda text: text.replace("agent/cli.py,sha256=", "agent/cli.py,sha256=,x", 1),
            "a row has 4 fields",
        ),
        (
            lambda text: text + "agent/gone.py,sha256=abc,3\n",
            f"{INFO}/RECORD lists files the wheel lacks: agent/gone.py",
        ),
    ],
    ids=["two-fields", "md5", "four-fields", "missing-file"],
)
def test_record_rows_are_well_formed_and_name_files_the_wheel_has(
    change: Callable[[str], str], problem: str
) -> None:
    files = base_files()
    error = refused(pack(files, record=change(record_of(files))))
    assert error.reason == RejectReason.MALFORMED
    assert problem in error.message


def test_a_size_that_is_not_a_number_is_refused() -> None:
    files = base_files()
    size = len(files["agent/cli.py"])
    record = record_of(files).replace(f"{record_hash(files['agent/cli.py'])},{size}", "sha256=a,x")
    error = refused(pack(files, record=record))
    assert f"{INFO}/RECORD gives agent/cli.py the size 'x'" in error.message


@pytest.mark.parametrize("extra", ["agent/backdoor.py", f"{INFO}/RECORD.jws"])
def test_a_file_not_in_record_is_refused_signature_files_too(extra: str) -> None:
    error = refused(pack(base_files(), after_record={extra: b"import os\n"}))
    assert error.reason == RejectReason.MALFORMED
    assert f"{extra} is in the wheel but not in its RECORD" in error.message


def test_a_file_whose_hash_or_size_differs_from_record_is_refused() -> None:
    files = base_files()
    record = record_of(files)
    tampered = {**files, "agent/cli.py": b"import os\n"}
    error = refused(pack(tampered, record=record))
    assert error.reason == RejectReason.HASH_MISMATCH
    assert f"agent/cli.py does not match its hash in {INFO}/RECORD" in error.message

    size = len(files["agent/cli.py"])
    wrong_size = record.replace(f"agent/cli.py,{record_hash(files['agent/cli.py'])},{size}", "")
    wrong_size += f"agent/cli.py,{record_hash(files['agent/cli.py'])},{size + 1}\n"
    error = refused(pack(files, record=wrong_size))
    assert error.reason == RejectReason.LENGTH_MISMATCH
    assert f"agent/cli.py is {size} bytes; {INFO}/RECORD says {size + 1}" in error.message


# ----------------------------------------------------------------------------- streaming


def test_member_chunks_yield_the_checked_bytes_and_check_them_again() -> None:
    files = base_files()
    files["agent/blob.bin"] = bytes(range(256)) * 1000  # several chunks
    with open_wheel(io.BytesIO(pack(files))) as archive:
        facts = inspect_wheel(archive)
        member = archive.getinfo("agent/blob.bin")
        assert b"".join(member_chunks(archive, member, facts)) == files["agent/blob.bin"]
        record = archive.getinfo(facts.record_name)  # not listed in itself: read as it is
        assert b"".join(member_chunks(archive, record, facts)) == record_of(files).encode()
        # What a device writes is checked again: facts that no longer fit the bytes.
        other = dataclasses.replace(
            facts, record={**facts.record, "agent/blob.bin": RecordEntry("A" * 43, None)}
        )
        with pytest.raises(WheelError, match=r"agent/blob\.bin does not match its hash"):
            for _ in member_chunks(archive, member, other):
                pass
        unlisted = dataclasses.replace(facts, record={})
        with pytest.raises(WheelError, match=r"agent/blob\.bin is in the wheel but not in"):
            next(member_chunks(archive, member, unlisted))

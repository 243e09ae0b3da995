"""Agent wheels for the self-update tests, built here the way a wheel is: a zip of this
checkout's ``agent/`` and ``shared/`` packages and an ``edgefleet-<v>.dist-info`` with
``METADATA``, ``WHEEL`` and a ``RECORD`` of every file's sha256 and size.

The agent reports the version of the ``dist-info`` beside its package, so a wheel
written with ``version="0.2.0"`` runs as 0.2.0. ``patch`` replaces files (a broken
build), and the keyword arguments make the wheels the device must refuse.
"""

from __future__ import annotations

import base64
import hashlib
import io
import zipfile
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

BROKEN_AT_START = b'raise SystemExit("this build of the agent is broken: it exits at start")\n'
"""Injected into ``agent/agent.py``: the agent exits as soon as ``run`` imports it."""
HANGS_AT_START = b"import time\n\ntime.sleep(3600)  # never connects, never reports\n"
"""Injected into ``agent/agent.py``: the agent hangs before it ever connects."""
_FUTURE = b"from __future__ import annotations\n"


def package_files() -> dict[str, bytes]:
    """This checkout's ``agent/`` and ``shared/`` sources, by path inside the wheel."""
    files = {}
    for package in ("agent", "shared"):
        for path in sorted((REPO / package).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                files[path.relative_to(REPO).as_posix()] = path.read_bytes()
    return files


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(
    version: str,
    *,
    patch: Mapping[str, bytes] | None = None,
    inject: Mapping[str, bytes] | None = None,
    name: str = "edgefleet",
    metadata_version: str | None = None,
    purelib: bool = True,
    extra: Mapping[str, bytes] | None = None,
    tamper_after_record: Mapping[str, bytes] | None = None,
) -> bytes:
    """A wheel of ``version``.

    ``patch`` replaces files and ``inject`` puts code into a module right after its
    ``from __future__`` import, both before RECORD is computed (a different but
    consistent build). ``extra`` adds entries with any name (``../escape.py``), listed
    in RECORD with their true hash. ``tamper_after_record`` changes files after RECORD
    was computed (a RECORD mismatch). ``metadata_version`` is the Version METADATA
    states (default: ``version``).
    """
    files = package_files()
    for path, code in (inject or {}).items():
        head, future, rest = files[path].partition(_FUTURE)
        assert future, f"{path} has no {_FUTURE!r}"
        files[path] = head + future + code + rest
    files.update(patch or {})
    files.update(extra or {})
    info = f"edgefleet-{version}.dist-info"
    files[f"{info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {metadata_version or version}\n"
        "Summary: the edgefleet agent (test build)\nRequires-Python: >=3.11\n\n"
    ).encode()
    files[f"{info}/WHEEL"] = (
        "Wheel-Version: 1.0\nGenerator: edgefleet-tests\n"
        f"Root-Is-Purelib: {'true' if purelib else 'false'}\n"
        f"Tag: {'py3-none-any' if purelib else 'cp311-cp311-linux_x86_64'}\n\n"
    ).encode()
    record = io.StringIO()
    for path, data in files.items():
        record.write(f"{path},{_record_hash(data)},{len(data)}\n")
    record.write(f"{info}/RECORD,,\n")
    files.update(tamper_after_record or {})
    files[f"{info}/RECORD"] = record.getvalue().encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return out.getvalue()

"""Provisioned agent images: what a device of one class needs to install the agent with no
package index, trust the fleet, and enroll (``edgefleet image build``).

An image is a ``.tar.gz`` holding one folder, ``edgefleet-<profile>/``::

    wheelhouse/*.whl        the agent's wheel (built from this checkout) and every wheel it
                            needs for the profile's platform and Python
    requirements.txt        what install.sh asks pip for (``edgefleet[agent]==0.1.0``, ...)
    agent.toml              the profile's agent.toml.template with the server and profile
                            numbers filled in; install.sh fills in the device's own values
    edgefleet-agent.service the profile's hardened systemd unit
    Dockerfile              the profile's container recipe (installs from wheelhouse/ only)
    profile.toml            the device class
    root.pub, keyring.json  the fleet's root public key and its root-signed keyring
    token                   the provisioning token the device enrolls with
    install.sh, verify.py   the installer (POSIX sh) and its verifier (stdlib Python:
                            :mod:`agent.image_verify`)
    MANIFEST.json           size and sha256 of every file above, and what the image is for
    MANIFEST.sig            a DSSE envelope over MANIFEST.json's exact bytes

Which key signs the manifest, and why: the fleet's **online** keys -- the keys that sign
desired states, as many as the keyring's threshold asks. The root key stays offline (an
image build must not need it), and a dedicated image key would be one more key for
devices to learn, rotate and revoke. The online keys are already vouched for by the root
through the keyring, which the image carries: ``root.pub`` -> ``keyring.json`` ->
``MANIFEST.sig`` -> every file verifies with nothing but the root public key, and an
online key rotated out of the keyring signs no new image that verifies against a new
keyring. The build therefore needs the server's keys folder (``--keys-dir``), the same
machine that mints provisioning tokens.

What the signature protects against, and what not: checked against the image's own
``root.pub`` (install.sh's default), it catches corruption and any edited, added or
removed file -- but whoever can rewrite the whole image can also replace its root key and
its verifier. Checked against the fleet's root key given out of band (``install.sh
--root-key``, ``python3 -m agent.image_verify`` on a device that has the agent,
``edgefleet image verify --root-key`` on an operator's machine) it also proves the fleet
built it.

What always holds: the archive is deterministic for the same inputs (sorted members, fixed
owners, modes and times); the wheelhouse holds wheels only (``--only-binary=:all:``);
``pip`` runs with a time-out on each request and on the whole download, and a failure
names what could not be found; nothing is written at ``out`` unless the image is complete
and verifies with :func:`agent.image_verify.verify_image`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlparse

from agent import image_verify
from server.errors import ServerError
from server.fleet.enrollment import split_token
from server.keys import load_fleet_keys
from server.profiles import DEFAULT_PROFILES_DIR, Profile, get_profile
from shared.signing import sign_envelope

__all__ = [
    "IMAGE_PROFILE_FILES",
    "ImageBuildError",
    "ImageInfo",
    "build_agent_wheel",
    "build_image",
    "download_wheelhouse",
    "image_requirements",
    "platform_tags",
    "render_template",
]

SOURCE_ROOT = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = Path(__file__).with_name("install.sh")
IMAGE_PROFILE_FILES = (
    "profile.toml",
    "agent.toml.template",
    "edgefleet-agent.service",
    "Dockerfile",
)
"""What every ``firmware_images/<profile>/`` folder holds."""
MANIFEST_SCHEMA_VERSION = 1
BUNDLE_HEADROOM_BYTES = 8 * 1024 * 1024  # bundle.json, self-tests and drift reference
PIP_REQUEST_TIMEOUT = 30  # seconds per request; pip retries twice
PIP_TOTAL_TIMEOUT = 1800.0
_PLACEHOLDER = re.compile(r"\{\{\s*([^{}\s]*)\s*\}\}")
_MANYLINUX_GLIBC = range(17, 36)  # wheels for glibc 2.17 (manylinux2014) .. 2.35
_ARCH_TAGS = {"x86_64": "x86_64", "aarch64": "aarch64", "armv7l": "armv7l"}
_PIP_SETTINGS = (
    "PIP_INDEX_URL",
    "PIP_EXTRA_INDEX_URL",
    "PIP_FIND_LINKS",
    "PIP_NO_INDEX",
    "PIP_CONSTRAINT",
    "PIP_REQUIREMENT",
)


class ImageBuildError(ServerError):
    """The image cannot be built; the message names the input or the step that failed."""


@dataclass(frozen=True, slots=True)
class ImageInfo:
    path: Path
    profile: str
    agent_version: str
    sha256: str
    size: int
    files: int
    wheels: list[str]
    signed_by: list[str]
    built_at: datetime


# ----------------------------------------------------------------------------- pure parts


def platform_tags(arch: str) -> list[str]:
    """pip ``--platform`` tags a device of ``arch`` (glibc 2.17 to 2.35) can install.

    pip does not widen one tag to the older manylinux ones, so every tag is listed.
    """
    try:
        machine = _ARCH_TAGS[arch]
    except KeyError as e:
        raise ImageBuildError(f"no wheel platform known for arch {arch!r}") from e
    tags = [f"manylinux_2_{minor}_{machine}" for minor in reversed(_MANYLINUX_GLIBC)]
    if machine != "armv7l":
        tags += [f"manylinux2014_{machine}", f"manylinux2010_{machine}", f"manylinux1_{machine}"]
    else:
        tags.append("linux_armv7l")  # piwheels' tag for Raspberry Pi OS builds
    return tags


def image_requirements(profile: Profile, agent_version: str, pyproject: Path) -> list[str]:
    """What pip installs on a device of ``profile``: the agent with the extra its runtime
    needs; a ``tflite-runtime`` device takes the ``agent`` extra's packages except
    ai-edge-litert (which has no build for it) plus the profile's own pins (``numpy<2``)."""
    runtime = profile.runtime.name
    if runtime == "litert":
        requirements = [f"edgefleet[agent]=={agent_version}"]
    elif runtime == "onnxruntime":
        requirements = [f"edgefleet[agent,agent-onnx]=={agent_version}"]
    else:
        try:
            extras = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"][
                "optional-dependencies"
            ]["agent"]
        except (OSError, KeyError, tomllib.TOMLDecodeError) as e:
            raise ImageBuildError(f"cannot read the agent extra from {pyproject}: {e}") from e
        requirements = [f"edgefleet=={agent_version}"] + [
            r for r in extras if not r.replace("_", "-").startswith("ai-edge-litert")
        ]
    return requirements + list(profile.python_requirements)


def render_template(text: str, values: dict[str, str], *, name: str) -> str:
    """``text`` with every ``{{key}}`` replaced by ``values[key]``; an unknown key is an error."""

    def replace(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise ImageBuildError(f"{name}: unknown placeholder {{{{{key}}}}}")
        return values[key]

    return _PLACEHOLDER.sub(replace, text)


def _check_inputs(server_url: str, token: str) -> None:
    parsed = urlparse(server_url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ImageBuildError(f"--server must look like https://host[:port], not {server_url!r}")
    try:
        split_token(token)
    except ServerError as e:
        raise ImageBuildError(
            "--token is not a provisioning token (efp.<id>.<secret>; `edgefleet tokens create`)"
        ) from e


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


# ----------------------------------------------------------------------------- pip


def _run_pip(
    args: Sequence[str], *, what: str, offline: bool, timeout: float, cwd: Path | None = None
) -> None:
    env = dict(os.environ)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    if offline:  # only the folders named on the command line count
        for name in _PIP_SETTINGS:
            env.pop(name, None)
        env["PIP_CONFIG_FILE"] = os.devnull
    command = [sys.executable, "-m", "pip", *args]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise ImageBuildError(
            f"{what}: pip did not finish within {timeout:g} s (is the package index reachable? "
            "or pass --wheelhouse-from DIR)"
        ) from e
    if result.returncode != 0:
        lines = [
            line
            for line in (result.stderr or result.stdout).splitlines()
            if line.strip() and not line.startswith("WARNING: Location")
        ]
        detail = "\n".join(lines[-12:])
        if "No matching distribution" in detail:
            hint = " (no wheel of it for this platform and Python where pip looked" + (
                "; add an index that has one -- for armv7, PIP_EXTRA_INDEX_URL="
                "https://www.piwheels.org/simple -- or pass --wheelhouse-from DIR)"
                if not offline
                else ")"
            )
        else:
            hint = "" if offline else " (is the package index reachable? or --wheelhouse-from DIR)"
        raise ImageBuildError(f"{what} failed{hint}:\n{detail}")


def build_agent_wheel(dest: Path, *, source_root: Path = SOURCE_ROOT) -> Path:
    """The ``edgefleet`` wheel of ``source_root``, built in a copy so the checkout stays clean."""
    if not (source_root / "pyproject.toml").is_file():
        raise ImageBuildError(f"{source_root} is not the edgefleet source tree (no pyproject.toml)")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgefleet-wheel-") as scratch:
        copy = Path(scratch) / "src"
        copy.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(source_root / name, copy / name)
        for package in ("agent", "server", "shared"):
            shutil.copytree(
                source_root / package,
                copy / package,
                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
            )
        # No build isolation: the build backend is the one this environment has, and the
        # build needs no package index.
        _run_pip(
            ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dest), "."],
            what="building the agent's wheel",
            offline=True,
            timeout=600,
            cwd=copy,
        )
    wheels = sorted(dest.glob("edgefleet-*.whl"))
    if len(wheels) != 1:
        raise ImageBuildError(f"expected one edgefleet wheel in {dest}, found {len(wheels)}")
    return wheels[0]


def download_wheelhouse(
    requirements: Sequence[str],
    dest: Path,
    *,
    arch: str,
    python_version: str,
    find_links: Sequence[Path] = (),
    offline: bool = False,
    timeout: float = PIP_TOTAL_TIMEOUT,
) -> list[Path]:
    """Every wheel ``requirements`` need on ``arch`` with CPython ``python_version``, into
    ``dest`` (files already there are reused). ``offline``: from ``find_links`` only."""
    if not re.fullmatch(r"3\.\d{1,2}", python_version):
        raise ImageBuildError(f"--python-version must look like 3.11, not {python_version!r}")
    dest.mkdir(parents=True, exist_ok=True)
    args = ["download", "--dest", str(dest), "--only-binary=:all:", "--implementation", "cp"]
    args += ["--python-version", python_version, "--progress-bar", "off"]
    args += ["--timeout", str(PIP_REQUEST_TIMEOUT), "--retries", "2"]
    for tag in platform_tags(arch):
        args += ["--platform", tag]
    for folder in find_links:
        args += ["--find-links", str(folder)]
    if offline:
        args.append("--no-index")
    args += list(requirements)
    where = "from " + ", ".join(map(str, find_links)) if offline else "from the package index"
    _run_pip(
        args,
        what=f"downloading wheels for {arch} / Python {python_version} {where}",
        offline=offline,
        timeout=timeout,
    )
    return sorted(dest.glob("*.whl"))


# ----------------------------------------------------------------------------- the image


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _file_mode(name: str) -> int:
    if name == "install.sh":
        return 0o755
    if name == "token":
        return 0o600
    return 0o644


def _write_archive(folder: Path, top: str, out: Path, *, mtime: int) -> None:
    """A deterministic ``.tar.gz`` of ``folder`` under ``top/``, written atomically."""

    def info(name: str, *, size: int = 0, directory: bool = False) -> tarfile.TarInfo:
        entry = tarfile.TarInfo(f"{top}/{name}" if name else top)
        entry.mtime, entry.uid, entry.gid, entry.uname, entry.gname = mtime, 0, 0, "root", "root"
        if directory:
            entry.type, entry.mode = tarfile.DIRTYPE, 0o755
        else:
            entry.size, entry.mode = size, _file_mode(name)
        return entry

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with (
            os.fdopen(fd, "wb") as raw,
            gzip.GzipFile(fileobj=raw, mode="wb", mtime=mtime) as gz,  # its header has a time
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            tar.addfile(info("", directory=True))
            for path in sorted(folder.rglob("*")):
                name = path.relative_to(folder).as_posix()
                if path.is_dir():
                    tar.addfile(info(name, directory=True))
                else:
                    with path.open("rb") as f:
                        tar.addfile(info(name, size=path.stat().st_size), f)
        os.replace(temp, out)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def build_image(
    *,
    profile_name: str,
    server_url: str,
    token: str,
    out: Path,
    keys_dir: Path,
    wheelhouse_from: Path | None = None,
    python_version: str = "3.11",
    profiles_dir: Path = DEFAULT_PROFILES_DIR,
    source_root: Path = SOURCE_ROOT,
    now: datetime | None = None,
    progress: Callable[[str], None] = lambda _message: None,
) -> ImageInfo:
    """Build the image for ``profile_name`` at ``out``; see the module docstring."""
    now = now or datetime.now(UTC)
    _check_inputs(server_url, token)
    try:
        profile = get_profile(profile_name, profiles_dir)
        keys = load_fleet_keys(keys_dir, now=now)
    except ServerError as e:
        raise ImageBuildError(str(e)) from e
    folder_in = profiles_dir / profile.name
    missing = [n for n in IMAGE_PROFILE_FILES if not (folder_in / n).is_file()]
    if missing:
        raise ImageBuildError(f"{folder_in} lacks {', '.join(missing)}")
    if wheelhouse_from is not None and not wheelhouse_from.is_dir():
        raise ImageBuildError(f"--wheelhouse-from {wheelhouse_from} is not a folder")

    top = f"edgefleet-{profile.name}"
    with tempfile.TemporaryDirectory(prefix="edgefleet-image-") as scratch:
        scratch_dir = Path(scratch)
        image = scratch_dir / top
        wheelhouse = image / "wheelhouse"
        progress("building the agent's wheel")
        agent_wheel = build_agent_wheel(scratch_dir / "agent-wheel", source_root=source_root)
        agent_version = agent_wheel.name.split("-")[1]
        requirements = image_requirements(profile, agent_version, source_root / "pyproject.toml")
        # The download names our own wheel by file, so an `edgefleet` on an index is never
        # taken instead of it; the device's requirements.txt names it by version.
        extras = requirements[0].removeprefix("edgefleet").split("==")[0]
        pinned = [f"edgefleet{extras} @ {agent_wheel.as_uri()}", *requirements[1:]]
        progress(
            f"collecting wheels for {profile.arch} / Python {python_version}"
            + (f" from {wheelhouse_from}" if wheelhouse_from else " from the package index")
        )
        download_wheelhouse(
            pinned,
            wheelhouse,
            arch=profile.arch,
            python_version=python_version,
            find_links=[agent_wheel.parent] + ([wheelhouse_from] if wheelhouse_from else []),
            offline=wheelhouse_from is not None,
        )
        non_wheels = [p.name for p in wheelhouse.iterdir() if p.suffix != ".whl"]
        if non_wheels:
            raise ImageBuildError(f"the wheelhouse holds files that are not wheels: {non_wheels}")

        progress("writing the image")
        values = {
            "profile": _toml_string(profile.name),
            "server_url": _toml_string(server_url),
            "latency_sla_ms_p95": repr(profile.latency_sla_ms_p95),
            "max_bundle_bytes": str(profile.max_model_bytes + BUNDLE_HEADROOM_BYTES),
            "python_version": python_version,
        }
        for name, target in (
            ("agent.toml.template", "agent.toml"),
            ("edgefleet-agent.service", "edgefleet-agent.service"),
            ("Dockerfile", "Dockerfile"),
        ):
            text = (folder_in / name).read_text(encoding="utf-8")
            (image / target).write_text(render_template(text, values, name=name), encoding="utf-8")
        shutil.copy2(folder_in / "profile.toml", image / "profile.toml")
        (image / "requirements.txt").write_text("\n".join(requirements) + "\n", encoding="utf-8")
        (image / "root.pub").write_text(keys.root_public.to_base64() + "\n", encoding="ascii")
        (image / "keyring.json").write_bytes(keys.keyring_envelope.to_bytes() + b"\n")
        (image / "token").write_text(token + "\n", encoding="ascii")
        script = INSTALL_SCRIPT.read_text(encoding="utf-8")
        for key, value in (
            ("PROFILE", profile.name),
            ("SERVER_URL", server_url),
            ("PYTHON_VERSION", python_version),
            ("AGENT_VERSION", agent_version),
        ):
            script = script.replace(f"@@{key}@@", shlex.quote(value))
        (image / "install.sh").write_text(script, encoding="utf-8")
        shutil.copy2(Path(image_verify.__file__), image / "verify.py")

        files: list[dict[str, str | int]] = [
            {
                "path": p.relative_to(image).as_posix(),
                "sha256": _sha256_file(p),
                "size": p.stat().st_size,
            }
            for p in sorted(image.rglob("*"))
            if p.is_file()
        ]
        manifest = {
            "schema": image_verify.MANIFEST_SCHEMA,
            "schema_version": MANIFEST_SCHEMA_VERSION,
            "profile": profile.name,
            "arch": profile.arch,
            "runtime": profile.runtime.model_dump(),
            "python_version": python_version,
            "platforms": platform_tags(profile.arch),
            "agent_version": agent_version,
            "requirements": requirements,
            "server_url": server_url,
            "built_at": now.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "keyring_version": keys.keyring.version,
            "files": files,
        }
        manifest_bytes = json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8") + b"\n"
        envelope = sign_envelope(manifest_bytes, image_verify.IMAGE_PAYLOAD_TYPE, keys.signing_keys)
        (image / image_verify.MANIFEST_NAME).write_bytes(manifest_bytes)
        (image / image_verify.SIGNATURE_NAME).write_bytes(envelope.to_bytes() + b"\n")
        try:  # the image must pass the device's own check before it leaves here
            image_verify.verify_image(image, root_key=keys.root_public.raw, now=now)
        except image_verify.ImageVerificationError as e:
            raise ImageBuildError(f"the built image does not verify: {e}") from e
        wheel_paths = sorted(wheelhouse.glob("*.whl"))
        _write_archive(image, top, out, mtime=int(now.timestamp()))

    return ImageInfo(
        path=out,
        profile=profile.name,
        agent_version=agent_version,
        sha256=_sha256_file(out),
        size=out.stat().st_size,
        files=len(files) + 2,
        wheels=sorted(p.name for p in wheel_paths),
        signed_by=[k.keyid for k in keys.signing_keys],
        built_at=now,
    )

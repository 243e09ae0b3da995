"""``edgefleet image``: provisioned agent images for a device class (:mod:`server.image`).

``build`` works on files, like ``edgefleet keys``: the server's keys folder (the image's
manifest is signed with the fleet's online keys) and the profile folders; the
provisioning token comes from ``edgefleet tokens create``. ``verify`` checks an image
against the fleet's root key before it is copied to devices or a mirror.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from server.commands.client import JsonOption, emit_json, err, fail
from server.image import ImageBuildError, ImageVerificationError, build_image, verify_image
from server.profiles import DEFAULT_PROFILES_DIR

__all__ = ["app"]

app = typer.Typer(
    help="Provisioned agent images: offline-installable, signed, ready to enroll.",
    no_args_is_help=True,
)


def _default_keys_dir() -> Path:
    return Path(os.environ.get("EDGEFLEET_DATA_DIR", "edgefleet-data")) / "keys"


@app.command()
def build(
    profile: Annotated[
        str, typer.Option("--profile", help="The device class (a firmware_images folder).")
    ],
    server: Annotated[
        str,
        typer.Option("--server", help="The fleet server devices enroll with, https://host:port."),
    ],
    token: Annotated[
        str,
        typer.Option(
            "--token",
            envvar="EDGEFLEET_PROVISIONING_TOKEN",
            help="Provisioning token (`edgefleet tokens create --profile P`).",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="The image file to write (.tar.gz).")],
    keys_dir: Annotated[
        Path | None,
        typer.Option(
            "--keys-dir",
            help="The server's keys folder. [default: $EDGEFLEET_DATA_DIR/keys]",
        ),
    ] = None,
    wheelhouse_from: Annotated[
        Path | None,
        typer.Option(
            "--wheelhouse-from",
            help="Take the dependencies' wheels from this folder, with no package index.",
        ),
    ] = None,
    python_version: Annotated[
        str, typer.Option("--python-version", help="The devices' Python (major.minor).")
    ] = "3.11",
    profiles_dir: Annotated[
        Path, typer.Option("--profiles-dir", help="Where the profile folders are.")
    ] = DEFAULT_PROFILES_DIR,
    as_json: JsonOption = False,
) -> None:
    """Build a self-contained image: the agent's wheelhouse for the profile's platform, its
    config, the fleet's root key, the provisioning token and an installer that checks the
    signed manifest before it installs anything."""
    try:
        info = build_image(
            profile_name=profile,
            server_url=server,
            token=token,
            out=out,
            keys_dir=keys_dir or _default_keys_dir(),
            wheelhouse_from=wheelhouse_from,
            python_version=python_version,
            profiles_dir=profiles_dir,
            progress=(lambda _m: None) if as_json else (lambda m: err.print(f"[dim]{m}...[/]")),
        )
    except ImageBuildError as e:
        fail(str(e), code=2)
        return
    summary = {
        "path": str(info.path),
        "profile": info.profile,
        "agent_version": info.agent_version,
        "sha256": info.sha256,
        "size": info.size,
        "files": info.files,
        "wheels": info.wheels,
        "signed_by": info.signed_by,
        "built_at": info.built_at.isoformat(),
    }
    if as_json:
        emit_json(summary)
        return
    typer.echo(f"image {info.path} ({info.size / 1e6:.1f} MB) for {info.profile}")
    typer.echo(f"  agent    {info.agent_version}, {len(info.wheels)} wheels")
    typer.echo(f"  sha256   {info.sha256}")
    typer.echo(f"  signed   by {', '.join(k[:16] + '...' for k in info.signed_by)}")
    top = f"edgefleet-{info.profile}"
    typer.echo(
        f"  install  tar xzf {info.path.name} && sudo sh {top}/install.sh --root-key root.pub"
    )


@app.command()
def verify(
    image: Annotated[Path, typer.Argument(help="The image (.tar.gz or its unpacked folder).")],
    root_key: Annotated[
        Path, typer.Option("--root-key", help="The fleet's root.pub, as known out of band.")
    ],
    allow_expired_keyring: Annotated[bool, typer.Option("--allow-expired-keyring")] = False,
    as_json: JsonOption = False,
) -> None:
    """Check an image's signed manifest and every file against the fleet's root key."""
    from shared.signing import VerifyKey

    try:
        key = VerifyKey.from_base64(root_key.read_text().strip())
    except (OSError, ValueError) as e:
        fail(f"cannot read the root key {root_key}: {e}", code=2)
        return
    try:
        verified = verify_image(
            image, root_key=key.raw, allow_expired_keyring=allow_expired_keyring
        )
    except ImageVerificationError as e:
        if as_json:
            emit_json({"verified": False, "reason": e.reason, "detail": str(e)})
            raise typer.Exit(1) from e
        fail(f"REFUSED ({e.reason}): {e}")
        return
    manifest = verified.manifest
    if as_json:
        emit_json(
            {
                "verified": True,
                "profile": manifest["profile"],
                "agent_version": manifest["agent_version"],
                "built_at": manifest["built_at"],
                "files": len(verified.files),
            }
        )
        return
    typer.echo(
        f"OK  {image}: {manifest['profile']} image, agent {manifest['agent_version']}, "
        f"built {manifest['built_at']}, {len(verified.files)} files as signed"
    )

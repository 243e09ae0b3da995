"""The ``edgefleet-agent`` command. Works with the ``agent`` extra alone."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from agent import __version__
from agent.errors import ConfigError
from shared.bundle import read_bundle
from shared.errors import ContractError
from shared.signing import Envelope, VerifyKey
from shared.trust import TrustState, accept_keyring

app = typer.Typer(
    name="edgefleet-agent",
    help="The edgefleet agent: verified model updates and offline inference on an edge device.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"edgefleet-agent {__version__}")
        raise typer.Exit


@app.callback()
def main_options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """The edgefleet agent: verified model updates and offline inference on an edge device."""


def _load_root_key(path: Path) -> VerifyKey:
    try:
        return VerifyKey.from_base64(path.read_text().strip())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the root public key {path}: {e}") from e


@app.command()
def verify(
    bundle: Annotated[Path, typer.Argument(help="The bundle file to check.")],
    root_key: Annotated[Path, typer.Option(help="The fleet's root public key (root.pub).")],
    keyring: Annotated[Path, typer.Option(help="A root-signed keyring (keyring.json).")],
    sha256: Annotated[str | None, typer.Option(help="Expected sha256 of the whole file.")] = None,
    length: Annotated[int | None, typer.Option(help="Expected length of the file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
) -> None:
    """Verify a model bundle offline, exactly as the agent does before activating it."""
    try:
        state = accept_keyring(
            TrustState.from_root_keys([_load_root_key(root_key)]),
            Envelope.from_bytes(keyring.read_bytes()),
            now=datetime.now(UTC),
        )
        assert state.keyring is not None
        with bundle.open("rb") as f:
            verified = read_bundle(
                f,
                trusted_keys=state.keyring.verify_keys(),
                threshold=state.keyring.threshold,
                expected_sha256=sha256,
                expected_length=length,
            )
    except (ConfigError, OSError) as e:
        err.print(f"[red]error:[/] {e}")
        raise typer.Exit(2) from e
    except ContractError as e:
        reason = getattr(e, "reason", "malformed")
        if as_json:
            sys.stdout.write(
                json.dumps({"verified": False, "reason": str(reason), "detail": str(e)}) + "\n"
            )
        else:
            err.print(f"[red]REJECTED[/] ({reason}): {e}")
        raise typer.Exit(1) from e
    m = verified.manifest
    info = {
        "verified": True,
        "model_name": m.model_name,
        "model_version": m.model_version,
        "target": m.target,
        "runtime": m.runtime,
        "format": m.format,
        "sha256": verified.sha256,
        "length": verified.length,
        "model_sha256": m.model_file.sha256,
        "self_tests": len(m.self_tests),
        "metrics": m.metrics,
    }
    if as_json:
        sys.stdout.write(json.dumps(info) + "\n")
        return
    typer.echo(f"OK  {m.model_name} v{m.model_version} for {m.target} ({m.runtime}, {m.format})")
    for key in ("sha256", "length", "model_sha256", "self_tests", "metrics"):
        typer.echo(f"    {key:13} {info[key]}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()

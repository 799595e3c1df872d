"""amiforge keys generate|list|revoke · sign · verify."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from amiforge.cli.common import JsonOption, open_registry
from amiforge.cli.output import console, emit_json

# The lifecycle (and with it cryptography, the scanners and the providers) is imported by the commands that use
# it: `keys list` only reads the registry.

app = typer.Typer(help="Signing keys (Ed25519 key files) the registry trusts.", no_args_is_help=True)


@app.command("generate")
def keys_generate(
    name: str = typer.Option("amiforge", "--name", help="File name stem: NAME.key and NAME.pub."),
    directory: Path | None = typer.Option(None, "--dir", help="Where to write them (default: <data>/keys)."),
    as_json: bool = JsonOption,
) -> None:
    """Make an Ed25519 key pair (the private key file is mode 0600; nothing is overwritten) and trust it."""
    from amiforge.lifecycle.sign import new_trusted_key

    settings, store = open_registry()
    info = new_trusted_key(store, directory or settings.data_dir / "keys", name, actor=settings.actor)
    if as_json:
        emit_json({"key_id": info.key_id, "private_key": info.private_path, "public_key": info.public_path})
        return
    console.print(
        f"key {info.key_id}\n  private {escape(str(info.private_path))} (keep it secret)"
        f"\n  public  {escape(str(info.public_path))}"
    )


@app.command("trust")
def keys_trust(
    public_key: Path | None = typer.Argument(None, help="An Ed25519 public key file (NAME.pub, PEM)."),
    kms_key: str | None = typer.Option(None, "--kms-key", help="Or: an AWS KMS ECC_NIST_P256 key (id, ARN, alias)."),
    kms_region: str | None = typer.Option(None, "--kms-region", help="The KMS key's region."),
    as_json: bool = JsonOption,
) -> None:
    """Trust a public key: signatures by it verify from now on (until revoked). Audited as `key.added`."""
    from amiforge.lifecycle.sign import trust_public_key

    settings, store = open_registry()
    key, added = trust_public_key(
        store,
        public_key=public_key,
        kms_key=kms_key,
        kms_region=kms_region or settings.kms_region,
        actor=settings.actor,
        settings=settings,
    )
    if as_json:
        emit_json({k: v for k, v in vars(key).items() if k != "public_key"} | {"added": added})
        return
    console.print(f"trusted {key.key_id}" if added else f"{key.key_id} was trusted already", markup=False)


@app.command("list")
def keys_list(as_json: bool = JsonOption) -> None:
    """The trusted keys, and which are revoked."""
    _, store = open_registry()
    keys = store.signing_keys()
    if as_json:
        emit_json([{k: v for k, v in vars(key).items() if k != "public_key"} for key in keys])
        return
    for key in keys:
        state = (
            f"[red]revoked[/] {key.revoked_at:%Y-%m-%d} ({escape(key.revoked_reason or '')})"
            if key.revoked_at
            else "[green]trusted[/]"
        )
        console.print(f"{escape(key.key_id)}  {escape(key.algorithm)}  added {key.added_at:%Y-%m-%d}  {state}")


@app.command("revoke")
def keys_revoke(
    key_id: str = typer.Argument(..., help="The key id, e.g. ed25519:0123456789abcdef."),
    reason: str = typer.Option(..., "--reason", help="Why (kept in the audit log)."),
    as_json: bool = JsonOption,
) -> None:
    """Stop trusting a key: every signature it made stops verifying."""
    from amiforge.lifecycle.sign import revoke_trusted_key

    settings, store = open_registry()
    key = revoke_trusted_key(store, key_id, reason=reason, actor=settings.actor)
    if as_json:
        emit_json({k: v for k, v in vars(key).items() if k != "public_key"})
        return
    console.print(f"revoked {key_id}", markup=False)


def sign_command(
    ref: str = typer.Argument(..., help="NAME@N or a digest prefix."),
    kms_key: str | None = typer.Option(None, "--kms-key", help="Sign with this AWS KMS key (id, ARN or alias)."),
    kms_region: str | None = typer.Option(None, "--kms-region", help="The KMS key's region."),
    key: Path | None = typer.Option(
        None, "--key", help="Ed25519 key file (default: AMIFORGE_SIGNING_KEY or <data>/keys/amiforge.key)."
    ),
    as_json: bool = JsonOption,
) -> None:
    """Sign the version's manifest (DSSE envelope, in-toto statement, SLSA provenance)."""
    from amiforge.lifecycle.sign import kms_signer, sign

    settings, store = open_registry()
    signer = kms_signer(kms_key, kms_region or settings.kms_region, settings) if kms_key else None
    record = sign(ref, store=store, settings=settings, key=key, signer=signer)
    if as_json:
        emit_json(record)
        return
    console.print(
        f"signed {store.get_version(ref).ref} with {record.key_id}; statement sha256:{record.statement_digest[:16]}",
        markup=False,
    )


def verify_command(
    ref: str = typer.Argument(..., help="NAME@N or a digest prefix."), as_json: bool = JsonOption
) -> None:
    """Check the signature against the artifact's bytes as they are now (exit 4 on any mismatch)."""
    from amiforge.lifecycle.sign import verify

    settings, store = open_registry()
    outcome = verify(ref, store=store, settings=settings)
    if as_json:
        emit_json(
            {
                "ok": True,
                "version": outcome.version.ref,
                "key_id": outcome.signature.key_id,
                "digest": outcome.manifest.digest,
                "findings_signed": outcome.manifest.findings_summary,
                "findings_now": outcome.findings_now,
            }
        )
        return
    console.print(
        f"[green]ok[/]: {escape(outcome.version.ref)} is signed by {escape(outcome.signature.key_id)} and its bytes "
        "match"
        f" (sha256:{outcome.manifest.digest[:16]})"
    )
    if outcome.findings_now is not None:
        console.print(
            f"  findings changed since signing (rescanned against newer data): signed "
            f"{outcome.manifest.findings_summary}, now {outcome.findings_now}; the gates judge the new ones",
            markup=False,
        )

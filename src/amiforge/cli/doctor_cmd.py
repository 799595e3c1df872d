"""amiforge doctor: which host tools are present, how to install the missing ones, and whether KVM works."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import typer
from rich.markup import escape
from sqlalchemy.engine import make_url

from amiforge.cli.common import JsonOption
from amiforge.cli.output import console, emit_json
from amiforge.errors import InfraError
from amiforge.model import check_aws_region
from amiforge.providers.local.qemu import kvm_probe
from amiforge.providers.local.tools import tool_report
from amiforge.settings import load_settings


def _probe_kvm(cache: Path) -> dict[str, object]:
    kernels = sorted(cache.glob("base/*/rootfs/boot/vmlinuz-*"))
    if not kernels:
        exists = os.path.exists("/dev/kvm")
        return {"usable": False, "why": f"not probed yet: bake once (the probe boots the image's kernel); "
                f"/dev/kvm {'exists' if exists else 'is absent'}"}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="amiforge-kvm-") as tmp:
        ok, why = kvm_probe(kernels[-1], Path(tmp), cache / "kvm-probe.json")
    return {"usable": ok, "why": why}


def _aws(region: str, as_json: bool) -> None:
    # Imported here: boto3 costs ~0.3 s of start-up, which only AWS users should pay.
    from amiforge.awsapi.clients import AwsSession
    from amiforge.providers.aws.doctor import aws_report

    report = aws_report(AwsSession(check_aws_region(region, what="--region")))
    if as_json:
        emit_json(report)
        return
    console.print(f"[green]ok[/]      AWS credentials: {escape(report.arn)} (account {escape(report.account)})")
    console.print(f"         regions enabled: {', '.join(report.regions)}", markup=False)
    console.print("         least-privilege IAM policy for every amiforge operation:")
    console.print(json.dumps(report.policy, indent=2), markup=False, highlight=False)


def doctor(
    aws: bool = typer.Option(
        False, "--aws", help="Check AWS instead: credentials, regions, and the IAM policy needed."
    ),
    region: str = typer.Option("us-east-1", "--region", help="With --aws: the home region to ask."),
    as_json: bool = JsonOption,
) -> None:
    """Check this machine: tools (and the apt line for the missing ones), root, KVM, registry location."""
    check_aws_region(region, what="--region")  # checked even without --aws: `--region --json` is a typo to catch
    if aws:
        _aws(region, as_json)
        return
    settings = load_settings()
    tools = tool_report()
    missing = [t for t in tools if t.path is None]
    kvm = _probe_kvm(settings.cache_dir)
    is_root = os.geteuid() == 0
    url = settings.registry_url
    # Settings checked the URL; never print its password.
    shown_url = make_url(url).render_as_string(hide_password=True)
    missing_packages = sorted({t.package for t in missing})
    report = {
        "python": sys.version.split()[0],
        "root": is_root,
        "tools": [{"tool": t.tool, "package": t.package, "path": t.path} for t in tools],
        "missing_packages": missing_packages,
        "kvm": kvm,
        "data_dir": str(settings.data_dir),
        "registry": shown_url,
    }
    problem = None
    if missing or not is_root:
        fix = "apt-get install " + " ".join(missing_packages) if missing else "run amiforge as root"
        problem = InfraError("this machine cannot bake local images yet", fix=fix)
    if as_json:
        # One JSON document on stdout, also when the machine is not ready (the handler would print a second).
        emit_json(report | {"ok": problem is None, "error": problem.as_dict() if problem else None})
        if problem is not None:
            raise typer.Exit(problem.exit_code)
        return
    for t in tools:
        mark = "[green]ok[/]     " if t.path else "[red]missing[/]"
        console.print(f"{mark} {t.tool:<20} {escape(t.path or 'apt-get install ' + t.package)}")
    console.print(
        f"{'[green]ok[/]     ' if is_root else '[red]no[/]     '} root (mmdebstrap, chroot and overlay mounts need it)"
    )
    console.print(f"{'[green]yes[/]    ' if kvm['usable'] else '[yellow]no[/]     '} KVM: {escape(str(kvm['why']))}")
    console.print(f"         data dir {escape(str(settings.data_dir))}; registry {escape(shown_url)}")
    if problem is not None:
        raise problem

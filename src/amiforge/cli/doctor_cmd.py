"""amiforge doctor: which host tools are present, how to install the missing ones, and whether KVM works."""

from __future__ import annotations

import json

import typer
from rich.markup import escape

from amiforge.cli.common import JsonOption
from amiforge.cli.output import console, emit_json
from amiforge.lifecycle.doctor import account_report, machine_report
from amiforge.model import check_aws_region
from amiforge.settings import load_settings


def _aws(region: str, as_json: bool) -> None:
    report = account_report(region, load_settings())
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
    machine = machine_report(settings)
    report = {
        "python": machine.python,
        "root": machine.root,
        "tools": [{"tool": t.tool, "package": t.package, "path": t.path} for t in machine.tools],
        "missing_packages": machine.missing_packages,
        "kvm": {"usable": machine.kvm_usable, "why": machine.kvm_why},
        "data_dir": machine.data_dir,
        "registry": machine.registry,
    }
    problem = machine.problem
    if as_json:
        # One JSON document on stdout, also when the machine is not ready (the handler would print a second).
        emit_json(report | {"ok": problem is None, "error": problem.as_dict() if problem else None})
        if problem is not None:
            raise typer.Exit(problem.exit_code)
        return
    for t in machine.tools:
        mark = "[green]ok[/]     " if t.path else "[red]missing[/]"
        console.print(f"{mark} {t.tool:<20} {escape(t.path or 'apt-get install ' + t.package)}")
    root = "[green]ok[/]     " if machine.root else "[red]no[/]     "
    console.print(f"{root} root (mmdebstrap, chroot and overlay mounts need it)")
    kvm = "[green]yes[/]    " if machine.kvm_usable else "[yellow]no[/]     "
    console.print(f"{kvm} KVM: {escape(machine.kvm_why)}")
    console.print(f"         data dir {escape(machine.data_dir)}; registry {escape(machine.registry)}")
    if problem is not None:
        raise problem

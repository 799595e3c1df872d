"""amiforge doctor: which host tools are present, how to install the missing ones, and whether KVM works — or, with
--aws, the AWS account: credentials, regions, the IAM policy, and the day-one checks of a recipe (--recipe)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape

from amiforge.cli.common import JsonOption
from amiforge.cli.output import console, emit_json, plain
from amiforge.errors import ConfigError
from amiforge.lifecycle.doctor import account_problem, account_report, machine_report
from amiforge.model import check_aws_region
from amiforge.providers.interface import AccountCheck, PolicyScope
from amiforge.recipe import load_recipe
from amiforge.settings import load_settings

_MARKS = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[red]fail[/]", "skipped": "[dim]skipped[/]"}


def check_line(check: AccountCheck) -> str:
    """One line per check: status, name (and region), detail, and the fix (rich markup; the texts escaped)."""
    where = f" {check.region}" if check.region else ""
    fix = f"  [bold]fix:[/] {escape(check.fix)}" if check.fix else ""
    mark = _MARKS[check.status] + " " * (8 - len(check.status))
    return f"{mark}{escape(check.name + where)}: {escape(check.detail)}{fix}"


def _aws(region: str | None, recipe_file: Path | None, as_json: bool, scope: PolicyScope) -> None:
    recipe = load_recipe(recipe_file) if recipe_file is not None else None
    report = account_report(region, load_settings(), recipe, provider="aws", scope=scope)
    problem = account_problem(report)
    if as_json:
        # One document, also when a check failed (the error handler would print a second).
        emit_json(plain(report) | {"ok": problem is None, "error": problem.as_dict() if problem else None})
        if problem is not None:
            raise typer.Exit(problem.exit_code)
        return
    console.print(f"[green]ok[/]      AWS credentials: {escape(report.arn)} (account {escape(report.account)})")
    console.print(f"        regions enabled: {', '.join(report.regions)}", markup=False)
    console.print("        least-privilege IAM policy for every amiforge operation:")
    console.print(json.dumps(report.policy, indent=2), markup=False, highlight=False)
    for note in report.policy_notes:  # where the policy allows more than it could, and the option that narrows it
        console.print(check_line(note), soft_wrap=True)
    home = f"home region {report.region}, {report.region_from}; no --recipe"
    about = f"recipe {recipe.name}" if recipe is not None else home
    console.print(f"        day-one checks ({escape(about)}):")
    for check in report.checks:
        console.print(check_line(check), soft_wrap=True)
    if problem is not None:
        raise problem


def doctor(
    aws: bool = typer.Option(
        False, "--aws", help="Check AWS instead: credentials, regions, the IAM policy, and day-one checks."
    ),
    region: str | None = typer.Option(
        None,
        "--region",
        help="With --aws: the home region to ask (default: the recipe's region, else the AWS configuration's, else "
        "us-east-1).",
    ),
    recipe: Path | None = typer.Option(
        None,
        "--recipe",
        help="With --aws: also check what this recipe needs (regions, network, keys, sharing, quotas).",
    ),
    pass_roles: list[str] = typer.Option(
        [],
        "--pass-role",
        metavar="ROLE_ARN",
        help="With --aws: a role amiforge may pass to EC2 (repeatable): the recipes' instance profiles' roles, and "
        "those of the launch templates a rollout points groups at; the policy passes only these (iam:PassRole), "
        "instead of any role.",
    ),
    kms_keys: list[str] = typer.Option(
        [],
        "--kms-key",
        metavar="KEY_ARN",
        help="With --aws: a KMS signing key's ARN (repeatable); the policy signs only with these, instead of any key.",
    ),
    as_json: bool = JsonOption,
) -> None:
    """Check this machine: tools (and the apt line for the missing ones), root, KVM, registry location."""
    if region is not None:
        check_aws_region(region, what="--region")  # checked even without --aws: `--region --json` is a typo to catch
    if aws:
        _aws(region, recipe, as_json, PolicyScope(tuple(pass_roles), tuple(kms_keys)))
        return
    if recipe is not None:
        raise ConfigError("--recipe goes with --aws", fix="amiforge doctor --aws --recipe FILE")
    if pass_roles or kms_keys:
        raise ConfigError("--pass-role and --kms-key go with --aws", fix="amiforge doctor --aws --pass-role ROLE_ARN")
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

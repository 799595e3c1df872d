"""doctor: can amiforge work here? This machine (host tools, root, KVM, where the registry is) for the local provider,
or an AWS account (identity, regions, the least-privilege IAM policy, and the day-one checks of a recipe: regions
enabled, network, encryption keys, public sharing, quotas) for the AWS provider. Reads only."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from sqlalchemy.engine import make_url

from amiforge.errors import ConfigError, InfraError
from amiforge.providers import provider_for
from amiforge.providers.interface import AccountChecker, AccountReport, HostChecker, PolicyScope, ToolStatus
from amiforge.recipe import Recipe
from amiforge.settings import Settings


@dataclass(frozen=True)
class MachineReport:
    python: str
    root: bool
    tools: list[ToolStatus]
    missing_packages: list[str]
    kvm_usable: bool
    kvm_why: str
    data_dir: str
    registry: str  # the registry URL with any password hidden

    @property
    def problem(self) -> InfraError | None:
        """Why this machine cannot bake local images yet, with the fix; None when it can."""
        if self.missing_packages:
            return InfraError(
                "this machine cannot bake local images yet", fix="apt-get install " + " ".join(self.missing_packages)
            )
        if not self.root:
            return InfraError("this machine cannot bake local images yet", fix="run amiforge as root")
        return None


def machine_report(settings: Settings) -> MachineReport:
    provider = provider_for("local", settings)
    if not isinstance(provider, HostChecker):  # pragma: no cover - the local provider checks its host
        raise ConfigError("the local provider cannot check this machine")
    host = provider.host_report()
    return MachineReport(
        python=sys.version.split()[0],
        root=os.geteuid() == 0,
        tools=host.tools,
        missing_packages=sorted({t.package for t in host.tools if t.path is None}),
        kvm_usable=host.kvm_usable,
        kvm_why=host.kvm_why,
        data_dir=str(settings.data_dir),
        # Settings checked the URL; never show its password.
        registry=make_url(settings.registry_url).render_as_string(hide_password=True),
    )


def account_report(
    region: str | None,
    settings: Settings,
    recipe: Recipe | None = None,
    *,
    provider: str,
    scope: PolicyScope = PolicyScope(),
) -> AccountReport:
    """Identity, regions, the IAM policy and the day-one checks of `provider`'s cloud account, asked from `region`
    (None: the provider picks its home region and says which); with `recipe`, the checks are for what it needs (its
    regions, network, keys, sharing). `scope` (the roles passed, the signing keys) narrows the policy."""
    spec = recipe.provider if recipe is not None else None
    if spec is not None and spec.type != provider:
        raise ConfigError(
            f"the recipe is for the {spec.type} provider; doctor --{provider} checks {provider} recipes",
            fix=f"run `amiforge doctor` (no --{provider}) for a {spec.type} recipe, or pass a {provider} recipe",
        )
    checker = provider_for(provider, settings)
    if not isinstance(checker, AccountChecker):
        raise ConfigError(
            f"the {provider} provider has no cloud account to check", fix="run `amiforge doctor` to check this machine"
        )
    return checker.account_report(region, spec, scope=scope)


def account_problem(report: AccountReport) -> InfraError | None:
    """Why the account is not ready (every failed check, by name and region), with the fix; None when it is."""
    failed = [c for c in report.checks if c.status == "fail"]
    if not failed:
        return None
    names = ", ".join(f"{c.name} ({c.region})" if c.region else c.name for c in failed)
    return InfraError(
        f"{len(failed)} day-one check{'s' if len(failed) != 1 else ''} failed: {names}",
        fix="fix each failed check as its line says, then run `amiforge doctor --aws` again",
    )

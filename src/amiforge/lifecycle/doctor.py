"""doctor: can amiforge work here? This machine (host tools, root, KVM, where the registry is) for the local provider,
or an AWS account (identity, regions, the least-privilege IAM policy) for the AWS provider. Reads only."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from sqlalchemy.engine import make_url

from amiforge.errors import ConfigError, InfraError
from amiforge.model import check_aws_region
from amiforge.providers import provider_for
from amiforge.providers.interface import AccountChecker, AccountReport, HostChecker, ToolStatus
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


def account_report(region: str, settings: Settings) -> AccountReport:
    check_aws_region(region, what="--region")
    provider = provider_for("aws", settings)
    if not isinstance(provider, AccountChecker):  # pragma: no cover - the AWS provider checks its account
        raise ConfigError("the aws provider cannot check an account")
    return provider.account_report(region)

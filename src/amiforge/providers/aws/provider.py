"""AwsProvider: the Provider protocol on EC2 — the same pipeline as the local provider, only the place changes.

bake → `bake.bake_on_ec2` (builder instance, steps over the recipe's communicator — SSM or SSH —, CreateImage);
boot test → `bake.boot_test_on_ec2`;
inspect → `snapshot.open_ami` (the root snapshot's bytes through the EBS direct APIs, mounted read-only, so scans read
exactly what ships, as they do for a local qcow2); digest → `images.image_digest` (the AMI's immutable description:
a cloud image's bytes cannot be hashed cheaply, its snapshot ids cannot change under its id).

Sessions are made per region from the settings (profile, one role per other account); tests pass the boto3
session their moto handlers hang on, a `machine_factory` standing in for the communicator, a `console_reader`, and
the clocks of every wait (bake and boot test, fleets, SSM's validation of a publication, a copy's progress).
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import boto3

from amiforge.awsapi.clients import MAX_PAGE_SIZE, AwsSession, call
from amiforge.errors import AmiforgeError, ConfigError, PartlyDone, StateError
from amiforge.model import Artifact, BootReport, LayerRecord, Leftover
from amiforge.providers.aws import allowed as aws_allowed
from amiforge.providers.aws import gc as aws_gc
from amiforge.providers.aws import retire as aws_retire
from amiforge.providers.aws.asg_records import parse_group_target
from amiforge.providers.aws.bake import AmiBuild, bake_on_ec2, boot_test_on_ec2
from amiforge.providers.aws.console import ConsoleFactory, ConsoleReader
from amiforge.providers.aws.distribute import COPY_WAIT, Progress, RegionTarget, distribute, plan_distribution
from amiforge.providers.aws.doctor import aws_report, home_region
from amiforge.providers.aws.fleet import AsgFleet
from amiforge.providers.aws.images import MANAGED_TAG, SourceImage, describe_image, image_digest, resolve_source
from amiforge.providers.aws.instances import Access, Placement, SshConnect
from amiforge.providers.aws.machine import MachineFactory
from amiforge.providers.aws.publish import VALIDATION_WAIT, publish
from amiforge.providers.aws.snapshot import open_ami
from amiforge.providers.aws.ssh import SshMachine
from amiforge.providers.interface import (
    AccountReport,
    BakeResult,
    Copy,
    Fleet,
    GcPlan,
    GcResult,
    ImageView,
    PhaseUpdate,
    PolicyScope,
    RegionSurvey,
    Removal,
    RunContext,
    RunningSurvey,
    RunState,
    Stored,
)
from amiforge.recipe import AwsProvider as AwsSpec
from amiforge.recipe import Checks, Recipe, step_fingerprint
from amiforge.recipe import Provider as ProviderSpec
from amiforge.settings import Settings
from amiforge.waiting import Wait

GIB = 1 << 30


def aws_spec(spec: ProviderSpec, what: str) -> AwsSpec:
    if not isinstance(spec, AwsSpec):
        raise ConfigError(f"{what} is for provider {spec.type!r}, not 'aws'", fix="use the provider the recipe names")
    return spec


def placement_of(spec: AwsSpec) -> Placement:
    return Placement(spec.subnet_id, tuple(spec.security_group_ids), spec.instance_profile)


def access_of(spec: AwsSpec) -> Access:
    return Access(spec.communicator, spec.ssh_username, spec.ssh_interface)


def artifact_of(image: Mapping[str, Any], region: str) -> Artifact:
    """The registry's record of an available AMI: its id, region, digest and the size of its volumes."""
    size = sum(int(m.get("Ebs", {}).get("VolumeSize") or 0) for m in image.get("BlockDeviceMappings", [])) * GIB
    return Artifact(
        provider="aws",
        region=region,
        location=str(image["ImageId"]),
        digest=image_digest(image, region),
        size_bytes=size,
    )


class AwsProvider:
    name: ClassVar[str] = "aws"

    def __init__(
        self,
        settings: Settings,
        *,
        boto_session: boto3.Session | None = None,
        machine_factory: MachineFactory | None = None,
        console_reader: ConsoleFactory = ConsoleReader,
        ssh_connect: SshConnect = SshMachine,
        wait: Wait = Wait(),
        boot_wait: Wait = Wait(first_delay=5.0, max_delay=15.0, deadline=900.0),
        tag_snapshots_at_creation: bool = True,
        fleet_wait: Wait = Wait(first_delay=5.0, max_delay=15.0, deadline=600.0),
        fleet_now: Callable[[], datetime] = lambda: datetime.now(UTC),
        publish_wait: Wait = VALIDATION_WAIT,
        copy_wait: Wait = COPY_WAIT,
        retire_page_size: int = MAX_PAGE_SIZE,
    ) -> None:
        self.settings = settings
        self._boto_session = boto_session
        self._sessions: dict[str, AwsSession] = {}
        self.machine_factory = machine_factory  # None: the recipe's communicator
        self.console_reader = console_reader
        self.ssh_connect = ssh_connect
        self.wait = wait
        self.boot_wait = boot_wait
        self.tag_snapshots_at_creation = tag_snapshots_at_creation
        self.fleet_wait = fleet_wait
        self.fleet_now = fleet_now
        self.publish_wait = publish_wait  # how long SSM may take to validate a channel's image (publish.py)
        self.copy_wait = copy_wait  # looks at a pending copy (distribute.py)
        self.retire_page_size = retire_page_size  # pages of retire's listings (tests read them a few items at a time)
        # Images as retire's last survey of each region listed them: each step uses its image's once.
        self._listed: dict[tuple[str, str], Mapping[str, Any]] = {}
        self._lock = threading.Lock()

    def session(self, region: str) -> AwsSession:
        """One session per region: the settings' profile and per-account roles, botocore's standard retries."""
        if region not in self._sessions:
            self._sessions[region] = AwsSession.from_settings(self.settings, region, boto_session=self._boto_session)
        return self._sessions[region]

    def account_report(
        self, region: str | None, spec: ProviderSpec | None = None, *, scope: PolicyScope = PolicyScope()
    ) -> AccountReport:
        """`doctor --aws`: identity, enabled regions, the least-privilege IAM policy (narrowed by `scope`: the roles
        passed to EC2, the signing keys) and the day-one checks, asked from `region` (None: doctor.home_region picks
        it); with a recipe's provider section, the checks are for what that recipe needs."""
        aws = aws_spec(spec, "doctor --aws --recipe") if spec is not None else None
        configured = (self._boto_session or boto3.Session(profile_name=self.settings.aws_profile)).region_name
        home, region_from = home_region(region, aws, configured)
        return aws_report(
            self.session(home),
            aws,
            region_from=region_from,
            pass_roles=scope.pass_roles,
            kms_keys=scope.signing_keys,
        )

    # --- bake -----------------------------------------------------------------------------------------------

    def _source(self, recipe: Recipe) -> tuple[AwsSpec, SourceImage]:
        spec = aws_spec(recipe.provider, f"recipe {recipe.name!r}")
        session = self.session(spec.region)
        return spec, resolve_source(spec.source, session, spec.region, instance_type=spec.instance_type)

    def preflight(self, recipe: Recipe) -> None:
        """The source image resolves (owner-pinned) with these credentials. Reads only."""
        self._source(recipe)

    def bake(self, recipe: Recipe, ctx: RunContext) -> BakeResult:
        spec, source = self._source(recipe)
        ctx.log(f"source image {source.image_id} ({source.name}, owner {source.owner})")
        session = self.session(spec.region)
        build = bake_on_ec2(
            recipe,
            source,
            session,
            ctx,
            machine_factory=self.machine_factory,
            console_reader=self.console_reader,
            ssh_connect=self.ssh_connect,
            wait=self.wait,
            placement=placement_of(spec),
            access=access_of(spec),
            tag_snapshots_at_creation=self.tag_snapshots_at_creation,
        )
        image = describe_image(session, spec.region, build.image_id)
        layers = self._layers(recipe, source, build, ctx)
        return BakeResult(artifact_of(image, spec.region), layers, build.generalised)

    @staticmethod
    def _layers(recipe: Recipe, source: SourceImage, build: AmiBuild, ctx: RunContext) -> tuple[LayerRecord, ...]:
        """What the bake did, as layers: the source image, then each step (an EC2 bake has no layer cache, so every
        layer is a miss; keys chain like the local provider's so two bakes of the same recipe can be compared)."""
        key = hashlib.sha256(f"aws-source\0{source.image_id}".encode()).hexdigest()
        records = [
            LayerRecord(0, key, f"base: {source.name} ({source.image_id})", False, ctx.phases.get("builder", 0.0), 0)
        ]
        for i, step in enumerate(recipe.steps, start=1):
            key = hashlib.sha256(f"{key}\0{step_fingerprint(step, recipe.folder)}".encode()).hexdigest()
            what = f"step {i}: {step.describe()}"
            records.append(LayerRecord(i, key, step.describe(), False, ctx.phases.get(what, 0.0), 0))
        ctx.log(f"image {build.image_id} from builder {build.builder_instance_id}")
        return tuple(records)

    # --- boot test ------------------------------------------------------------------------------------------

    def boot_test(self, artifact: Artifact, checks: Checks, ctx: RunContext, spec: ProviderSpec) -> BootReport:
        aws = aws_spec(spec, f"artifact {artifact.location}")
        return boot_test_on_ec2(
            artifact.location,
            checks,
            self.session(artifact.region),
            ctx,
            region=artifact.region,
            instance_type=aws.boot_test_instance_type or aws.instance_type,
            machine_factory=self.machine_factory,
            console_reader=self.console_reader,
            ssh_connect=self.ssh_connect,
            wait=self.boot_wait,
            placement=placement_of(aws),
            access=access_of(aws),
        )

    def adopt(self, region: str, location: str) -> Artifact:
        """An available image made elsewhere (Packer's), from now on managed by amiforge: it and its snapshots are
        tagged amiforge:managed=true, so distribute may share them (IAM allows sharing only what carries that tag,
        iam.py). gc still never removes them: it collects only what also carries a run's tag (amiforge:run), which
        adopting does not set. Adopting again changes nothing (CreateTags of an existing tag). An image another
        account owns (shared with this one) is adopted untagged: it can be launched, copied and published, not shared
        onwards."""
        session = self.session(region)
        image = describe_image(session, region, location)
        if image.get("State") != "available":
            raise StateError(
                f"image {location} in {region} is {image.get('State')}, not available",
                fix="import it once it is available",
            )
        ec2 = session.client("ec2", region)
        # Only this account's images are tagged: a Packer image shared from a build account cannot be tagged (or
        # shared onwards) from here, and adopting it must not fail for that.
        account = str(call(session.client("sts"), "GetCallerIdentity", "the caller")["Account"])
        if str(image.get("OwnerId")) == account:
            snapshots = [
                str(m["Ebs"]["SnapshotId"])
                for m in image.get("BlockDeviceMappings", [])
                if "SnapshotId" in m.get("Ebs", {})
            ]
            managed = [{"Key": MANAGED_TAG, "Value": "true"}]
            call(ec2, "CreateTags", location, Resources=[location, *snapshots], Tags=managed)
        return artifact_of(image, region)

    # --- distribution and publication ----------------------------------------------------------------------

    def distribute(
        self,
        artifact: Artifact,
        spec: ProviderSpec,
        *,
        run_id: str,
        public: bool,
        on_copy: Callable[[Copy], None],
        progress: Callable[[PhaseUpdate], None],
    ) -> list[Copy]:
        aws = aws_spec(spec, f"artifact {artifact.location}")
        wanted = aws.distribution
        if not (wanted.regions or wanted.accounts or wanted.organizations or wanted.organizational_units):
            raise ConfigError(
                f"the recipe of {artifact.location} lists no region to copy to and no one to share with",
                fix="add provider.distribution (regions: [{region: eu-west-1, kms_key: …}], accounts, organizations, "
                "organizational_units) to the recipe",
            )
        plan = plan_distribution(
            artifact.location,
            artifact.region,
            [RegionTarget(r.region, r.kms_key) for r in wanted.regions],
            run_id=run_id,
            accounts=wanted.accounts,
            org_arns=wanted.organizations,
            ou_arns=wanted.organizational_units,
            public=wanted.public,
            public_flag=public,
        )
        session = self.session(artifact.region)
        adopted: set[str] = set()
        done: dict[str, Copy] = {}

        def step(update: Progress) -> None:
            # Worker threads, one per region: each writes only its own region's entries.
            if update.step == "adopted":
                adopted.add(update.region)
            if update.step == "done" and update.image_id is not None:
                image = describe_image(session, update.region, update.image_id)
                copy = Copy(
                    artifact,
                    artifact_of(image, update.region),
                    update.region in adopted,
                    plan.share.describe(plan.public),
                )
                done[update.region] = copy
                on_copy(copy)
                progress(PhaseUpdate(update.region, "done", update.image_id))
            elif update.step in ("adopted", "copying"):
                progress(PhaseUpdate(update.region, "start", update.step))

        result = distribute(plan, session, on_progress=step, copy_wait=self.copy_wait)
        return [done[r.region] for r in result.regions]

    def publish(
        self, artifacts: list[Artifact], spec: ProviderSpec, *, name: str, channel: str, run_id: str
    ) -> list[dict[str, object]]:
        """One publication per artifact's region and account. A failure after some were made is a PartlyDone carrying
        their records (they happened: the caller records them), and the failure itself."""
        aws = aws_spec(spec, f"{name}:{channel}")
        records: list[dict[str, object]] = []
        try:
            for artifact in artifacts:
                home = self.session(artifact.region)
                # The caller's account, then each consumer account through its role (its own parameter and template).
                for account, session in ((None, home), *((a, home.as_account(a)) for a in aws.publish.accounts)):
                    done = publish(
                        session,
                        region=artifact.region,
                        name=name,
                        channel=channel,
                        image_id=artifact.location,
                        parameter_prefix=aws.publish.parameter_prefix,
                        launch_template=aws.publish.launch_template,
                        run_id=run_id,
                        wait=self.publish_wait,
                    )
                    records.append({**dataclasses.asdict(done), "account": account})
        except AmiforgeError as e:
            if records:
                raise PartlyDone(e, records) from e
            raise
        return records

    # --- gc (Collector): tagged resources of finished runs, found by their tags -------------------------------

    def plan_gc(
        self,
        region: str,
        *,
        registered: Collection[str],
        run_state: Callable[[str], RunState],
        recorded: Sequence[tuple[str | None, Leftover]],
        min_age: timedelta,
        now: datetime,
    ) -> GcPlan:
        # `recorded` is not needed: everything a run creates carries its run tag, so gc finds what failed cleanups
        # left (and what a killed run never got to clean) by asking EC2, not by trusting the event log's words.
        del recorded
        return aws_gc.plan_gc(
            self.session(region), region, registered_images=registered, run_state=run_state, min_age=min_age, now=now
        )

    def apply_gc(self, plan: GcPlan, *, max_deletions: int) -> GcResult:
        return aws_gc.apply_gc(self.session(plan.region), plan, max_deletions=max_deletions)

    # --- retire (Retirer): what uses an image in a region, and the steps out -----------------------------------

    def survey(self, region: str, artifacts: Collection[Artifact]) -> RegionSurvey:
        seen: dict[str, Mapping[str, Any]] = {}
        survey = aws_retire.survey_region(
            self.session(region), region, artifacts, page_size=self.retire_page_size, roles=self.settings.aws_roles,
            seen=seen,
        )  # fmt: skip
        with self._lock:
            self._listed.update({(region, image): found for image, found in seen.items()})
        return survey

    def _known(self, artifact: Artifact) -> Mapping[str, Any] | None:
        with self._lock:
            return self._listed.pop((artifact.region, artifact.location), None)  # used once: a step changes it

    def deprecate(self, artifact: Artifact, at: datetime) -> tuple[str, ...]:
        return aws_retire.deprecate(self.session(artifact.region), artifact, at, known=self._known(artifact))

    def deregister(self, artifact: Artifact) -> tuple[Removal, str]:
        return aws_retire.deregister(self.session(artifact.region), artifact, known=self._known(artifact))

    def delete_snapshots(self, region: str, snapshots: Sequence[str]) -> list[str]:
        return aws_retire.delete_snapshots(self.session(region), region, snapshots)

    def restore(self, artifact: Artifact) -> None:
        aws_retire.restore(self.session(artifact.region), artifact)

    def stored(self, region: str, artifacts: Collection[Artifact]) -> Mapping[str, Stored]:
        return aws_retire.stored(self.session(region), region, artifacts)

    def allowed_criteria(self, region: str, artifacts: Collection[Artifact]) -> list[dict[str, Any]]:
        return aws_allowed.criteria_for(self.session(region), region, {a.location for a in artifacts})

    def running(self, regions: Collection[str]) -> RunningSurvey:
        return aws_allowed.running(self.session, regions)

    # --- fleets ---------------------------------------------------------------------------------------------

    def fleet(self, name: str) -> Fleet:
        """An Auto Scaling group, named `REGION/GROUP` (the rollout target `aws:REGION/GROUP`)."""
        region, group = parse_group_target(name)
        return AsgFleet(self.session(region), region, group, wait=self.fleet_wait, now=self.fleet_now)

    def fleet_region(self, name: str) -> str:
        return parse_group_target(name)[0]

    # --- inspection -----------------------------------------------------------------------------------------

    def inspect(self, artifact: Artifact) -> AbstractContextManager[ImageView]:
        return self._inspect(artifact)

    @contextmanager
    def _inspect(self, artifact: Artifact) -> Iterator[ImageView]:
        session = self.session(artifact.region)
        image = describe_image(session, artifact.region, artifact.location)
        with open_ami(session, artifact.region, image, self.settings.cache_dir / "scratch") as view:
            yield view

    def current_digest(self, artifact: Artifact) -> str:
        """The digest of the AMI's description as EC2 reports it now (NotFound once it is deregistered)."""
        image = describe_image(self.session(artifact.region), artifact.region, artifact.location)
        return image_digest(image, artifact.region)
